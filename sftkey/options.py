"""The options of the public functions, declared once: each field with its default, its check
and its meaning (docs/design.md's symbols), from which the classes' documentation, the
functions' signatures (:func:`with_options`), the oracle's, and :mod:`sftkey.core.compiled`'s
custom ops are made. One frozen object per call, checked when it is made (a ``ValueError`` or
``TypeError`` naming the option); the tensors' shapes against the targets are checked with the
inputs (:mod:`sftkey.core.inputs`).

Every entry point takes its option names from these classes: :func:`sftkey.linear_cross_entropy`,
:func:`sftkey.logit_stats`, :func:`sftkey.linear_divergence` (keyword arguments, or a prebuilt
object as ``options=``), :class:`sftkey.LinearCrossEntropyLoss`, :mod:`sftkey.distributed` and
:func:`sftkey.integrations.transformers.use_fused_loss`.
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .backends import NAMES as BACKENDS
from .backends import TWO_HEAD_NAMES
from .backends.engine import Backend
from .core.divergence import KINDS as DIVERGENCES

REDUCTIONS = ("mean", "sum", "none")


# ---- the checks, one per kind of value ------------------------------------------------------

def _number(low=None, high=None, low_open=False, optional=False) -> Callable:
    """A real number (not a bool, not NaN) in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def check(name: str, value) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
        if value != value:
            raise ValueError(f"{name} must not be NaN")
        if low is not None and (value < low or (low_open and value == low)):
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"{name} must be <= {high}, got {value}")

    return check


def _float_tensor(name: str, value) -> None:
    """None, or a floating-point tensor."""
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def _float_tensor_or_number(name: str, value) -> None:
    """None, a finite real number, or a floating-point tensor (its values: with the inputs')."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        _number()(name, value)
        if abs(float(value)) == float("inf"):
            raise ValueError(f"{name} must be finite, got {value}")
    else:
        _float_tensor(name, value)


def _integer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _boolean(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _one_of(choices: tuple) -> Callable:
    def check(name: str, value) -> None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    return check


def _backend(name: str, value) -> None:
    if isinstance(value, str):
        _one_of(BACKENDS)(name, value)
    elif not isinstance(value, Backend):
        raise TypeError(f"{name} must be a name or a sftkey Backend, got {type(value).__name__}")


def _normalizer(name: str, value) -> None:
    """None, a number > 0, or a one-element tensor > 0 (its value is read on the host, except
    while ``torch.compile`` traces: then inside :mod:`sftkey.core.compiled`'s op)."""
    if value is None:
        return
    if not isinstance(value, Tensor):
        _number(low=0.0, low_open=True)(name, value)
        return
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
    if not torch.compiler.is_compiling() and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {float(value)}")


def _anchor(name: str, value) -> None:
    if value is not None and (not isinstance(value, tuple) or len(value) not in (2, 3)):
        raise TypeError(f"{name} must be a tuple (ref_hidden, ref_weight) or (ref_hidden, ref_weight, ref_bias)")


def _no_jsd_on_triton(name: str, kind: str, backend) -> None:
    """The triton backend's two-head kernels are the forward and reverse KL's: "jsd" is refused."""
    if isinstance(backend, str) and backend == "triton" and kind == "jsd":
        raise ValueError(f"{name}='jsd' has no triton kernels (the JSD is not a function of per-row "
                         "statistics): use backend='torch' (or 'auto'), or kind 'forward_kl' / 'reverse_kl'")


# ---- the declaration ------------------------------------------------------------------------

def option(default, check: Callable, doc: str, *, schema: Optional[str] = None, per_token: bool = False):
    """A field of an options class: its ``default``, its ``check(name, value)``, its ``doc``;
    ``schema``: its type in a custom op's schema (None: not passed to the op); ``per_token``:
    a tensor indexed like the targets (shifted and flattened with them; a 0-d one is a scalar)."""
    return field(default=default, metadata=dict(check=check, doc=doc, schema=schema, per_token=per_token))


def _documented(cls):
    """The class's docstring followed by one line per field: name, default, meaning."""
    lines = [f"* ``{f.name}`` (``{f.default!r}``): {f.metadata['doc']}" for f in fields(cls)
             if f.name in cls.__dict__.get("__annotations__", {})]
    cls.__doc__ = cls.__doc__.rstrip() + "\n\n" + "\n".join(f"    {line}" for line in lines) + "\n"
    return cls


class Options:
    """What every options class shares: its names, its checks, how a call builds one."""

    @classmethod
    def names(cls) -> tuple:
        """The option names, in field order (read from the dataclass's own table, which
        ``torch.compile`` traces, where ``dataclasses.fields`` of a class it does not)."""
        return tuple(cls.__dataclass_fields__)

    def __post_init__(self):
        for name, f in self.__dataclass_fields__.items():  # (the table torch.compile traces)
            f.metadata["check"](name, getattr(self, name))

    @classmethod
    def build(cls, options: Optional["Options"], kwargs: dict, caller: str):
        """``options`` (an instance, or None for the defaults) with ``kwargs`` replacing fields;
        a ``TypeError`` naming ``caller`` for a name that is not an option."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; its options are "
                            f"{list(cls.names())}")
        if options is None:
            return cls(**kwargs)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
        return replace(options, **kwargs) if kwargs else options

    @classmethod
    def per_token(cls) -> tuple:
        """The names of the options indexed like the targets."""
        return tuple(name for name, f in cls.__dataclass_fields__.items() if f.metadata["per_token"])


@_documented
@dataclass(frozen=True)
class HeadOptions(Options):
    """What defines the logits rows and how they are computed."""

    class_weights: Optional[Tensor] = option(
        None, _float_tensor, "``[V]``, the class weights ``c_j``: torch's ``weight=`` of ``F.cross_entropy``.",
        schema="Tensor?")
    softcap: Optional[float] = option(
        None, _number(low=0.0, low_open=True, optional=True), "``cap > 0``: ``z <- cap * tanh(z / cap)``, or None.",
        schema="float?")
    ignore_index: int = option(-100, _integer, "the target value of tokens without a loss.", schema="int")
    backend: Union[str, Backend] = option(
        "auto", _backend, f"one of {BACKENDS}, or a :class:`~sftkey.backends.engine.Backend`.", schema="str")
    filter_eps: Optional[float] = option(
        None, _number(low=0.0, optional=True),
        "skip gradient tiles whose probabilities are all below it (triton-fused; None: exact).", schema="float?")


@_documented
@dataclass(frozen=True)
class LossOptions(HeadOptions):
    """Every option of :func:`sftkey.linear_cross_entropy`: :class:`HeadOptions`' and these."""

    token_weights: Optional[Tensor] = option(
        None, _float_tensor, "``[...]`` like the targets: the cross-entropy weight ``a_i`` (default 1), >= 0.",
        schema="Tensor?", per_token=True)
    entropy_weights: Union[Tensor, float, None] = option(
        None, _float_tensor_or_number, "``[...]`` like the targets, or a scalar: the coefficient ``e_i`` of the "
        "term ``-e_i H_i``: ``e_i > 0`` rewards entropy (a bonus), ``e_i < 0`` penalizes it (entropy "
        "minimization); not in the ``\"mean\"``'s denominator.", schema="Tensor?", per_token=True)
    label_smoothing: float = option(0.0, _number(0.0, 1.0), "``eps`` in [0, 1].", schema="float")
    z_loss: float = option(0.0, _number(low=0.0), "``zeta >= 0``: the coefficient of ``lse_i^2``.", schema="float")
    dft: bool = option(False, _boolean, "``s_i = stopgrad(p_{y_i})`` scales the cross-entropy (DFT).", schema="bool")
    reduction: str = option("mean", _one_of(REDUCTIONS), f"one of {REDUCTIONS}.", schema="str")
    normalizer: Union[Tensor, float, None] = option(
        None, _normalizer, "``> 0``: the ``\"mean\"`` divisor instead of ``sum_i a_i c_{y_i}``.", schema="Tensor?")
    shift: bool = option(False, _boolean, "position ``t`` predicts ``targets[..., t + 1]`` (the per-token "
                         "options shift with the targets).", schema="bool")
    return_stats: bool = option(False, _boolean, "also return the per-token :class:`~sftkey.LossStats`.",
                                schema="bool")
    anchor: Optional[tuple] = option(
        None, _anchor, "``(ref_hidden, ref_weight[, ref_bias])``, a frozen reference head: each token's loss "
        "adds ``anchor_weight * a_i * D_i``, ``D_i`` the ``anchor_kind`` divergence between the policy's and the "
        "reference's distributions (docs/design.md, \"Two heads\"), in the same pass over the policy logits. "
        "ASFT is ``dft=True, anchor_kind=\"forward_kl\"`` with its authors' weight 0.1 (:func:`sftkey.methods.asft`).")
    anchor_weight: Optional[float] = option(
        None, _number(optional=True), "``lambda``, the anchor's coefficient: no default, an anchor needs it.")
    anchor_kind: str = option("forward_kl", _one_of(DIVERGENCES), f"one of {DIVERGENCES}.")
    anchor_beta: float = option(0.5, _number(0.0, 1.0), "the JSD's ``beta`` for ``anchor_kind=\"jsd\"``.")

    def __post_init__(self):
        super().__post_init__()
        if self.anchor is not None:
            _no_jsd_on_triton("anchor_kind", self.anchor_kind, self.backend)
            if self.anchor_weight is None:
                raise ValueError("anchor_weight is required with an anchor (it has no default; ASFT's authors use "
                                 "0.1, sftkey.methods.ASFT_ANCHOR_WEIGHT)")


@_documented
@dataclass(frozen=True)
class DivergenceOptions(Options):
    """Every option of :func:`sftkey.linear_divergence` (docs/design.md, "Two heads"). Liger's
    ``jsd_beta`` ``b`` is ``beta = 1 - b`` here."""

    kind: str = option("forward_kl", _one_of(DIVERGENCES),
                       "\"forward_kl\" (``KL(q || p)``, q the reference), \"reverse_kl\" (``KL(p || q)``) or \"jsd\" "
                       "(``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``).")
    beta: float = option(0.5, _number(0.0, 1.0), "the JSD's ``beta`` in [0, 1].")
    temperature: float = option(1.0, _number(low=0.0, low_open=True),
                                "``T > 0``: both heads' logits are divided by it (no ``T^2`` factor).")
    token_weights: Optional[Tensor] = option(None, _float_tensor, "``[...]`` like the targets: ``a_i`` (default 1).",
                                             per_token=True)
    ignore_index: int = option(-100, _integer, "the target value of tokens that do not count.")
    shift: bool = option(False, _boolean, "position ``t`` is compared with ``targets[..., t + 1]`` (the last "
                         "position drops out).")
    reduction: str = option("mean", _one_of(REDUCTIONS), f"one of {REDUCTIONS}: ``\"mean\"`` divides by "
                            "``sum_i a_i`` over the tokens that count.")
    normalizer: Union[Tensor, float, None] = option(None, _normalizer, "``> 0``: the ``\"mean\"`` divisor.")
    ref_grad: bool = option(False, _boolean, "also give gradients to ``ref_hidden``, ``ref_weight`` and "
                            "``ref_bias`` (default: the reference is frozen, its tensors detached).")
    backend: str = option("auto", _one_of(TWO_HEAD_NAMES), f"one of {TWO_HEAD_NAMES} (\"triton\": the forward and "
                          "reverse KL's block math in Triton row kernels; not the JSD).")

    def __post_init__(self):
        super().__post_init__()
        _no_jsd_on_triton("kind", self.kind, self.backend)


def with_options(cls, *, after: str):
    """Give a function ``f(..., options=None, **kwargs)`` the signature that lists each field of
    ``cls`` as a keyword-only parameter with its default (for ``help()`` and ``inspect``), in
    place of ``**kwargs``; ``after`` is the parameter they follow."""

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = [p.name for p in params].index(after) + 1
        options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                     default=None if f.default is MISSING else f.default) for f in fields(cls)]
        fn.__signature__ = sig.replace(parameters=params[:at] + options + params[at:])
        return fn

    return decorate
