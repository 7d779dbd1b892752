"""Optimizers: SAM/ASAM and the sparse SSAM-F/SSAM-D. Imports nothing from the training code.

Layout: ``sam`` (the wrapper and the two-pass protocol), ``sparse`` (``SparseSAM``, the masked base class),
``ssamf`` and ``ssamd`` (SSAM-F, SSAM-D), ``settings`` (settings in ``defaults`` and the param groups), ``state``
(``opt.state`` and the ``state_dict`` formats), ``perturb`` (the perturbation math, single-tensor and foreach),
``mask`` (the flat mask buffer), ``groups`` (granularity: channel, tensor and N:M groups), ``dropgrow`` (SSAM-D's
drop and grow), ``select`` (the one top-k rule), ``fisher`` (the empirical Fisher; its batched path in
``fisher_hooks``), ``bn`` (BatchNorm statistics around pass two), ``amp`` (fp16 loss scaling for two passes),
``registry`` (the optimizer families), ``factory`` (optimizers by ``--opt`` name), ``refresh`` (the mask refresh
protocol), ``schedule`` and ``steps`` (ascent schedules), ``ascent`` (where the perturbation's direction comes from),
``msharp`` (m-sharpness).
"""

from .amp import TwoPassScaler
from .bn import disable_running_stats, enable_running_stats, frozen_bn_stats
from .factory import create_optimizer
from .fisher import FISHER_METHODS, empirical_fisher
from .sam import CLOSURE_PASSES, SAM
from .select import top_k_mask
from .sparse import STRATEGIES, SparseSAM
from .ssamd import SSAMD
from .ssamf import SSAMF

__all__ = [
    "SAM",
    "SparseSAM",
    "SSAMF",
    "SSAMD",
    "TwoPassScaler",
    "create_optimizer",
    "empirical_fisher",
    "frozen_bn_stats",
    "enable_running_stats",
    "disable_running_stats",
    "top_k_mask",
    "STRATEGIES",
    "FISHER_METHODS",
    "CLOSURE_PASSES",
]
