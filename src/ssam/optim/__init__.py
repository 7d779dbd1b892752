"""Optimizers: SAM/ASAM and the sparse SSAM-F/SSAM-D. Imports nothing from the training code."""
from .amp import TwoPassScaler
from .fisher import empirical_fisher, frozen_bn_stats
from .sam import SAM
from .ssam import SSAMD, SSAMF, top_k_mask

__all__ = ["SAM", "SSAMF", "SSAMD", "TwoPassScaler", "empirical_fisher", "frozen_bn_stats", "top_k_mask"]
