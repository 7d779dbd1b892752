"""ssam: Sharpness-Aware Minimization with sparse perturbation (Mi et al., NeurIPS 2022)."""

from .optim import (
    SAM,
    SSAMD,
    SSAMF,
    SparseSAM,
    TwoPassScaler,
    create_optimizer,
    disable_running_stats,
    enable_running_stats,
    frozen_bn_stats,
)

__version__ = "0.1.0"
__all__ = [
    "SAM",
    "SparseSAM",
    "SSAMF",
    "SSAMD",
    "TwoPassScaler",
    "create_optimizer",
    "frozen_bn_stats",
    "enable_running_stats",
    "disable_running_stats",
    "__version__",
]
