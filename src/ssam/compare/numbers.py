"""How the comparison prints a mean ± spread: one rule per table column.

A column's decimals are those that show its smallest non-zero spread to two significant digits (at most
``MAX_DECIMALS``, at least none: a whole-number column stays whole, ``1159 ± 122``); every mean and spread of the
column uses them, so the digits line up in meaning. A column with no spread (one seed each) uses its metric's own
default. One seed prints no spread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MAX_DECIMALS = 4
NONE = "—"  # a value that is missing or does not apply (the mask density of SGD and SAM)


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def column_decimals(spreads: Iterable[Any], default: int) -> int:
    """Decimals for a column whose spreads are ``spreads`` (NaN/None: no spread); ``default`` when none is > 0."""
    positive = [abs(float(s)) for s in spreads if finite(s) and s != 0]
    if not positive:
        return default
    smallest = min(positive)
    # Two significant digits: the first at 10**floor(log10(s)), the second one place further right.
    decimals = 1 - math.floor(math.log10(smallest))
    return max(0, min(MAX_DECIMALS, decimals))


def value(v: Any, decimals: int, sign: bool = False) -> str:
    if not finite(v):
        return NONE
    return f"{v:+.{decimals}f}" if sign else f"{v:.{decimals}f}"


def mean_pm(mean: Any, spread: Any, decimals: int, sign: bool = False) -> str:
    """``86.43 ± 0.24``; the mean alone without a spread (one seed); NONE without a mean."""
    if not finite(mean):
        return NONE
    text = value(mean, decimals, sign)
    return f"{text} ± {float(spread):.{decimals}f}" if finite(spread) else text
