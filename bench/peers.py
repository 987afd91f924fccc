"""The implementations compared, each a loss ``fn(x, w, y, token_weights) -> scalar`` built for
the run's options: sftkey's backends and the peers, with what each can express.

An implementation that cannot run is skipped with a reason: :meth:`Impl.skip_reason` checks
what needs no import (device, options, installed packages); :meth:`Impl.build` raises
:class:`Skip` for what only importing reveals.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .cases import IGNORE_INDEX, Options

ALL_OPTIONS = frozenset({"token_weights", "entropy", "label_smoothing", "softcap", "z_loss"})


class Skip(Exception):
    """This implementation cannot run here; the message says why."""


@dataclass(frozen=True)
class Impl:
    name: str
    build: Callable  # (Options, torch.device) -> loss fn
    supports: frozenset = ALL_OPTIONS
    package: Optional[str] = None  # distribution whose version is reported
    device_skip: Callable = lambda device: None  # torch.device -> reason or None

    def skip_reason(self, device: torch.device, opts: Options) -> Optional[str]:
        reason = self.device_skip(device)
        if reason:
            return reason
        if self.package and importlib.util.find_spec(_module(self.package)) is None:
            return f"not installed (pip install {self.package})"
        lacking = opts.active() - self.supports
        if lacking:
            return f"n/a for these options ({', '.join(sorted(lacking))})"
        return None

    def version(self) -> Optional[str]:
        return package_version(self.package or "sftkey")


def _module(package: str) -> str:
    return package.replace("-", "_")


def package_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def weighted_mean(ce, y, a, opts: Options, lse=None, entropy=None):
    """docs/design.md's mean of ``a * ce + zeta * lse^2 - e * H`` over non-ignored tokens, divided by
    ``sum a`` (the count without token weights), from a peer's per-token terms."""
    valid = y != IGNORE_INDEX
    a = valid.float() if a is None else a * valid
    loss = a * torch.where(valid, ce, 0)
    if opts.z_loss:
        loss = loss + opts.z_loss * torch.where(valid, lse, 0) ** 2
    if opts.entropy:
        loss = loss - opts.entropy * torch.where(valid, entropy, 0)
    return loss.sum() / a.sum()


def _sftkey(backend: str):
    def build(opts: Options, device: torch.device):
        import sftkey
        from sftkey.core.driver import resolve_backend

        try:
            resolve_backend(backend, device, torch.float32)  # (the dtype matters to "auto" alone)
        except (ImportError, ValueError) as e:
            raise Skip(f"backend {backend!r} unavailable: {e}") from None

        def loss(x, w, y, a):
            return sftkey.linear_cross_entropy(x, w, y, **opts.sftkey_kwargs(a), backend=backend,
                                               filter_eps=opts.filter_eps)
        return loss
    return build


def eager_loss(opts: Options):
    """What one writes in PyTorch: materialized float32 logits, ``F.cross_entropy``."""
    per_token = bool(opts.active() - {"label_smoothing", "softcap"})

    def loss(x, w, y, a):
        z = (x @ w.T).float()
        if opts.softcap:
            z = opts.softcap * torch.tanh(z / opts.softcap)
        if not per_token:
            return F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, label_smoothing=opts.label_smoothing)
        ce = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, label_smoothing=opts.label_smoothing,
                             reduction="none")
        lse = torch.logsumexp(z, -1) if opts.z_loss or opts.entropy else None
        entropy = lse - (torch.softmax(z, -1) * z).sum(-1) if opts.entropy else None
        return weighted_mean(ce, y, a, opts, lse=lse, entropy=entropy)
    return loss


def _compiled(opts: Options, device: torch.device):
    return torch.compile(eager_loss(opts), dynamic=False)


def _cce(opts: Options, device: torch.device):
    """Cut Cross-Entropy: its Triton kernels on CUDA, its ``torch_compile`` path elsewhere."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device.type == "cuda" else "torch_compile"
    kwargs = dict(ignore_index=IGNORE_INDEX, softcap=opts.softcap, impl=impl)
    if impl == "cce":  # CCE's default filter_eps="high" filters gradients: exact unless asked
        kwargs["filter_eps"] = opts.filter_eps

    def loss(x, w, y, a):
        if a is None:
            return linear_cross_entropy(x, w, y, **kwargs)
        return weighted_mean(linear_cross_entropy(x, w, y, reduction="none", **kwargs), y, a, opts)
    return loss


def _torch_lce(opts: Options, device: torch.device):
    """PyTorch's own ``F.linear_cross_entropy`` on its chunked path (``LinearCrossEntropyOptions()``,
    automatic policy), the fused loss every torch user has."""
    options = torch.nn.LinearCrossEntropyOptions()

    def loss(x, w, y, a):
        return F.linear_cross_entropy(x, w, y, ignore_index=IGNORE_INDEX, options=options)
    return loss


def _torch_lce_missing(device: torch.device) -> Optional[str]:
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    return f"torch {torch.__version__} has no F.linear_cross_entropy (PyTorch 2.13 and later)"


def _liger(opts: Options, device: torch.device):
    """Liger-Kernel's fused linear CE, accumulating gradients in float32 as sftkey does."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if opts.token_weights and opts.z_loss:  # Liger's per-token losses fold the z-loss into the CE
        raise Skip("n/a for these options (token_weights with z_loss)")
    make = lambda reduction: LigerFusedLinearCrossEntropyLoss(  # noqa: E731
        ignore_index=IGNORE_INDEX, lse_square_scale=opts.z_loss, label_smoothing=opts.label_smoothing,
        softcap=opts.softcap, reduction=reduction, accum_dtype=torch.float32)
    mean, per_token = make("mean"), make("none")

    def loss(x, w, y, a):
        if a is None:
            return mean(w, x, y)
        return weighted_mean(per_token(w, x, y), y, a, opts)  # no entropy, and no z-loss (skipped above)
    return loss


def _trl(opts: Options, device: torch.device):
    """TRL's fused LM head (``ChunkedLogProbFunction``) as TRL's own fused forward calls it:
    only the valid tokens on Triton devices, every token (targets clamped, then masked) elsewhere."""
    try:  # TRL's private names: its chunk size and its test for Triton devices
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # its backward imports this module too
    except ImportError as e:
        raise Skip(f"import failed: {e}") from None
    outputs = ("entropy",) if opts.entropy else ()
    compact = _use_triton(device)

    def loss(x, w, y, a):
        valid = y != IGNORE_INDEX
        xs, ys = (x[valid], y[valid]) if compact else (x, y.clamp_min(0))
        logp, entropy, *_ = ChunkedLogProbFunction.apply(
            xs, w, None, ys, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, opts.softcap, 1.0, outputs)
        if compact:  # back to one value per token
            logp, entropy = (t if t is None else t.new_zeros(y.shape).masked_scatter(valid, t) for t in (logp, entropy))
        return weighted_mean(-logp, y, a, opts, entropy=entropy)
    return loss


def _triton_device(device: torch.device) -> Optional[str]:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET"):
        return None
    return "Triton kernels need CUDA; TRITON_INTERPRET=1 runs them in the (slow) interpreter"


def _cuda_device(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "needs CUDA (its fused linear CE is Triton-only)"


IMPLS = {impl.name: impl for impl in (
    Impl("sftkey-triton", _sftkey("triton"), device_skip=_triton_device),
    Impl("sftkey-triton-fused", _sftkey("triton-fused"), device_skip=_triton_device),
    Impl("sftkey-torch", _sftkey("torch")),
    Impl("torch-eager", lambda opts, device: eager_loss(opts)),
    Impl("torch-compile", _compiled),
    # chunked only for plain cross-entropy: with label smoothing it materializes, with a warning
    Impl("torch-lce", _torch_lce, frozenset(), device_skip=_torch_lce_missing),
    Impl("cce", _cce, frozenset({"token_weights", "softcap"}), "cut-cross-entropy"),
    Impl("liger", _liger, frozenset({"token_weights", "label_smoothing", "softcap", "z_loss"}),
         "liger-kernel", _cuda_device),
    Impl("trl", _trl, frozenset({"token_weights", "entropy", "softcap"}), "trl"),
)}
