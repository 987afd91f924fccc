"""sftkey: fused linear cross-entropy for LLM fine-tuning, without the N x V logits."""
from . import reference
from .api import LinearCrossEntropyLoss, linear_cross_entropy, linear_divergence, logit_stats
from .config import set_chunk_budget, set_lowp_products
from .options import DivergenceOptions, HeadOptions, LossOptions
from .results import LogitStats, LossStats

__version__ = "0.1.0"

#: Subpackages imported on first use (``sftkey.methods.asft`` after ``import sftkey``), so that
#: ``import sftkey`` needs neither transformers nor torch.distributed's set-up.
_LAZY = ("methods", "distributed", "integrations")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sftkey' has no attribute {name!r}")

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
