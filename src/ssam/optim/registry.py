"""The optimizer families, one entry each: the one place that knows what ``sam``, ``ssamf`` and ``ssamd`` are.

An ``OptimInfo`` says which class a wrapper is, whether its perturbation is masked, how its mask is refreshed, and
which settings belong to it (a setting is named the same as a keyword of the class and a flag of ``ssam train``;
the trainer-only ones, such as ``skip_dead``, are listed with the family they mean something to). The factory, the
command line's validation, the run identity and ``ssam compare`` read it; nothing else lists the families.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .sam import SAM
from .ssamd import SSAMD
from .ssamf import SSAMF

__all__ = [
    "KEYWORD_OF",
    "OptimInfo",
    "BaseInfo",
    "WRAPPERS",
    "BASES",
    "PLAIN",
    "DEFAULT_BASE",
    "family",
    "owned_settings",
    "applies",
]

# Settings of every SAM-family optimizer, then of the sparse ones, then of one family alone.
SAM_SETTINGS = (
    "rho",
    "adaptive",
    "sam_first_pass",
    "freeze_bn_second_pass",
    "sam_schedule",
    "sam_micro_batch",
    "sam_ascent",
)
SPARSE_SETTINGS = ("sparsity", "granularity", "cost_aware", "skip_dead", "renormalize", "update_freq")
FISHER_SETTINGS = ("num_samples", "fisher_mode", "fisher_method")
DYNAMIC_SETTINGS = ("drop_rate", "drop_strategy", "growth_strategy")


@dataclass(frozen=True)
class OptimInfo:
    """A family of optimizers: ``cls`` wraps any base optimizer (None: the base optimizer alone)."""

    name: str
    label: str  # how tables and plots name it
    cls: type[SAM] | None
    sparse: bool  # its perturbation is masked
    settings: tuple[str, ...]  # every setting that means something to it (and to no plainer family)

    @property
    def sam(self) -> bool:
        return self.cls is not None

    @property
    def mask_refresh(self) -> str | None:
        """``"before_epoch"`` (SSAM-F's Fisher), ``"first_backward"`` (SSAM-D's drop and grow) or None."""
        return None if self.cls is None else self.cls.mask_refresh


@dataclass(frozen=True)
class BaseInfo:
    name: str
    cls: type[torch.optim.Optimizer]
    settings: tuple[str, ...]


PLAIN = OptimInfo("sgd", "SGD", None, False, ())  # compare calls the plain family "sgd" whatever its base
WRAPPERS: dict[str, OptimInfo] = {
    "sam": OptimInfo("sam", "SAM", SAM, False, SAM_SETTINGS),
    "ssamf": OptimInfo("ssamf", "SSAM-F", SSAMF, True, SAM_SETTINGS + SPARSE_SETTINGS + FISHER_SETTINGS),
    "ssamd": OptimInfo("ssamd", "SSAM-D", SSAMD, True, SAM_SETTINGS + SPARSE_SETTINGS + DYNAMIC_SETTINGS),
}
BASES: dict[str, BaseInfo] = {
    "sgd": BaseInfo("sgd", torch.optim.SGD, ("momentum", "nesterov")),
    "adamw": BaseInfo("adamw", torch.optim.AdamW, ("betas", "eps")),
}
# Settings whose flag is named apart from the optimizer's keyword (the flag says it is SAM's).
KEYWORD_OF = {"sam_schedule": "schedule", "sam_micro_batch": "micro_batch", "sam_ascent": "ascent"}
DEFAULT_BASE = "sgd"  # of a bare wrapper name (``ssamf``) in create_optimizer and on the command line


def family(wrapper: str | None) -> OptimInfo:
    """The family of a parsed ``--opt`` (its wrapper part; None or ``"sgd"``: the plain family)."""
    return PLAIN if wrapper in (None, PLAIN.name) else WRAPPERS[wrapper]


@functools.cache
def owned_settings() -> frozenset[str]:
    """Every setting some family or base optimizer owns; the others apply to every run."""
    return frozenset(s for f in WRAPPERS.values() for s in f.settings) | frozenset(
        s for b in BASES.values() for s in b.settings
    )


def applies(setting: str, wrapper: str | None, base: str | None = None) -> bool:
    """Whether ``setting`` means something to the optimizer ``wrapper``-``base`` (base None: any base)."""
    if setting in (s for b in BASES.values() for s in b.settings):
        return base is None or setting in BASES[base].settings
    if setting in owned_settings():
        return setting in family(wrapper).settings
    return True
