"""ssam: Sharpness-Aware Minimization with sparse perturbation (Mi et al., NeurIPS 2022)."""
from .optim import SAM, SSAMD, SSAMF, TwoPassScaler, frozen_bn_stats

__version__ = "0.1.0"
__all__ = ["SAM", "SSAMF", "SSAMD", "TwoPassScaler", "frozen_bn_stats", "__version__"]
