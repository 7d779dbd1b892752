"""``--config FILE.yaml``: flag values from a file, checked against the parser's types and choices."""

from __future__ import annotations

import argparse
import os
from typing import Any

import yaml

from ..errors import UsageError, did_you_mean

__all__ = ["yaml_defaults"]


def yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"--config {path!r}: file not found")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path!r}: expected a mapping of flag names to values, got {type(raw).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in raw.items():
        if key not in actions:
            raise UsageError(
                f"--config {path!r}: unknown key {key!r}{did_you_mean(str(key), actions)}; allowed keys are the flag "
                f"names, e.g. {', '.join(sorted(actions)[:8])}, ..."
            )
        act = actions[key]
        out[key] = _check_type(path, key, act, value)
    return out


def _check_type(path: str, key: str, act: argparse.Action, value: Any) -> Any:
    bad = f"--config {path!r}: key {key!r} has {type(value).__name__} {value!r}; expected "
    if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(bad + "true or false")
        return value
    if value is None:
        return None
    if act.nargs in ("+", 2):
        items = value if isinstance(value, list) else [value]
        if act.nargs == 2 and len(items) != 2:
            raise UsageError(bad + "a list of 2 values")
        return [_check_scalar(bad, act, v) for v in items]
    return _check_scalar(bad, act, value)


def _check_scalar(bad: str, act: argparse.Action, value: Any) -> Any:
    if act.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(bad + "an integer")
    if act.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(bad + "a number")
        value = float(value)
    if act.type is None and not isinstance(value, str):
        raise UsageError(bad + "a string")
    if callable(act.type) and act.type not in (int, float):  # a parsing type (--granularity): its own rule
        if not isinstance(value, str):  # YAML reads an unquoted 2:4 as the number 124 (base 60)
            raise UsageError(bad + "a string (quote an N:M form: '2:4')")
        try:
            value = act.type(value)
        except argparse.ArgumentTypeError as e:
            raise UsageError(bad.split(" has ")[0] + f": {e}") from None
    if act.choices and value not in act.choices:
        raise UsageError(bad + "one of " + ", ".join(map(str, act.choices)))
    return value
