"""sftkey: fused linear cross-entropy for LLM fine-tuning, without the N x V logits."""
from . import reference
from .api import LinearCrossEntropyLoss, linear_cross_entropy, linear_divergence, logit_stats
from .config import set_chunk_budget, set_lowp_products
from .options import DivergenceOptions, HeadOptions, LossOptions
from .results import LogitStats, LossStats

__version__ = "0.1.0"

__all__ = [
    "DivergenceOptions",
    "HeadOptions",
    "LinearCrossEntropyLoss",
    "LogitStats",
    "LossOptions",
    "LossStats",
    "linear_cross_entropy",
    "linear_divergence",
    "logit_stats",
    "reference",
    "set_chunk_budget",
    "set_lowp_products",
]
