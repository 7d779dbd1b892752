"""ssam: Sharpness-Aware Minimization with sparse perturbation (Mi et al., NeurIPS 2022)."""

from importlib import metadata as _metadata

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

try:  # one place for the version: the package metadata (pyproject.toml)
    __version__ = _metadata.version("sparse-sam")
except _metadata.PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
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
