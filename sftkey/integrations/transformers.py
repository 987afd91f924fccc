"""Hugging Face causal LMs that compute their training loss with :func:`sftkey.linear_cross_entropy`.

``use_fused_loss(model)`` replaces ``model.forward`` on that one instance (the class and
other instances are untouched). Called with ``labels``, the patched forward runs the model's
own forward with its LM head swapped for a stub that records the head's input and returns
a ``[..., 2]`` probe instead of ``[..., V]`` logits, then computes the loss from the recorded
hidden states and the head's weight and bias. No ``N x V`` tensor exists; ``output.logits``
is None. Without ``labels`` (generation, inference) the model's own forward runs unchanged.

It works for any ``*ForCausalLM`` whose forward calls ``get_output_embeddings()`` once on the
final hidden states, and keeps the model's conventions:

* labels are shifted (position ``t`` predicts label ``t + 1``), or ``shift_labels`` are
  taken as they are; ``token_weights`` / ``entropy_weights`` are indexed like the labels;
* tied embeddings and an LM-head bias (the head's own ``weight`` and ``bias``);
* transforms of the hidden states before the head (they are inside the recorded input);
* final logit soft-capping from the config (``final_logit_softcapping``: Gemma 2/3;
  ``logits_soft_cap``: RecurrentGemma);
* logit scaling (Cohere's ``logit_scale``, Granite's division by ``logits_scaling``,
  Falcon-H1's ``lm_head_multiplier``, ...): the scale is *measured* from what the forward
  does to the probe on the first labelled call, checked against a second probe value, and
  folded into the hidden states and bias. A post-processing that is not a scale (after
  the config's soft-cap) raises ``NotImplementedError`` instead of training on a wrong loss;
* ``num_items_in_batch`` (``Trainer``'s gradient-accumulation count) becomes ``normalizer``;
* an MoE model's ``aux_loss`` is added with its ``router_aux_loss_coef``, as its forward does;
* PEFT models: the base model is patched, so LoRA on the body trains as usual and
  ``modules_to_save=["lm_head"]`` trains the head's copy. An adapter *on* the LM head
  (LoRA etc.) is refused with a ``ValueError``: the fused loss needs the head as one matrix.

Loss options (``token_weights``, ``entropy_weights``, ``class_weights``, ``label_smoothing``,
``z_loss``, ``dft``, ``ignore_index``, ``backend``, ``filter_eps``, ``return_stats``) are set
for every call in ``use_fused_loss(model, **options)`` and per call as ``model(...)`` keyword
arguments, which win. With ``return_stats=True`` the output carries ``output.stats``
(:class:`sftkey.LossStats`: ``lse``, ``entropy``, ``target_logprob``, ``correct``, shaped
like the labels after the shift; last in the tuple with ``return_dict=False``).

Patch the model itself, before wrapping it in DDP/FSDP. The forward's signature lists the
loss options, so ``Trainer(remove_unused_columns=True)`` keeps a ``token_weights`` column.
"""
from __future__ import annotations

import inspect
import math
import types
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

import sftkey
from sftkey.options import LossOptions

__all__ = ["use_fused_loss", "is_patched", "FusedLossHandle", "LOSS_OPTIONS"]

#: Keyword arguments of ``model(...)`` that go to :func:`sftkey.linear_cross_entropy`: its
#: options (:class:`sftkey.LossOptions`) but those the model itself sets (the label shift,
#: its soft-cap, the Trainer's normalizer, the mean reduction).
LOSS_OPTIONS = tuple(n for n in LossOptions.names() if n not in ("shift", "softcap", "normalizer", "reduction"))
_EXTRA_KWARGS = (*LOSS_OPTIONS, "shift_labels", "num_items_in_batch")
_PER_TOKEN = ("token_weights", "entropy_weights")
_PROBE = (1.0, -3.0)
_MISSING = object()
_ATTR = "_sftkey_fused_loss"  # the model's handle; wrappers of the forward (accelerate's autocast) keep it


def use_fused_loss(model: nn.Module, **options) -> "FusedLossHandle":
    """Make ``model`` (a Hugging Face causal LM, or a PEFT model around one) compute its loss
    with :func:`sftkey.linear_cross_entropy` whenever it is called with ``labels``.

    ``options``: defaults for the :data:`LOSS_OPTIONS`. Returns a :class:`FusedLossHandle`;
    ``handle.remove()`` restores the forward, and ``with use_fused_loss(model): ...`` patches
    for the block only.
    """
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"use_fused_loss: unknown options {unknown}; expected any of {list(LOSS_OPTIONS)}")
    return FusedLossHandle(_causal_lm(model), options)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the base model of a PEFT model) is patched by :func:`use_fused_loss`."""
    return isinstance(getattr(_causal_lm(model), _ATTR, None), FusedLossHandle)


class FusedLossHandle:
    """The patch of one model's forward; :meth:`remove` (or leaving a ``with`` block) undoes it."""

    def __init__(self, model: nn.Module, options: dict):
        if is_patched(model):
            raise ValueError("use_fused_loss: the model is already patched; remove() the first patch")
        if model.get_output_embeddings() is None:
            raise ValueError(f"use_fused_loss: {type(model).__name__} has no output embeddings (LM head)")
        self.model = model
        self.options = options
        self._saved = model.__dict__.get("forward", _MISSING)
        self._call_original = _unbound(model.forward, model)
        config = model.config.get_text_config()
        self.softcap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None)
        self.scale: Optional[float] = None  # measured on the first labelled call

        def forward(module, *args, **kwargs):  # a deep copy of the model calls its own handle
            return getattr(module, _ATTR)._forward(module, *args, **kwargs)

        forward.__signature__ = _signature_with_options(model.forward)
        forward.__doc__ = type(model).forward.__doc__
        model.forward = types.MethodType(forward, model)
        setattr(model, _ATTR, self)

    def remove(self) -> None:
        """Restore the forward the model had before :func:`use_fused_loss`."""
        if getattr(self.model, _ATTR, None) is not self:
            return
        delattr(self.model, _ATTR)
        if self._saved is _MISSING:
            del self.model.forward
        else:
            self.model.forward = self._saved

    def __enter__(self) -> "FusedLossHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _forward(self, model: nn.Module, *args, **kwargs):
        labels = kwargs.pop("labels", None)
        shift_labels = kwargs.pop("shift_labels", None)
        normalizer = kwargs.pop("num_items_in_batch", None)
        per_call = {k: kwargs.pop(k) for k in LOSS_OPTIONS if k in kwargs}
        if labels is None and shift_labels is None:
            given = [k for k in _PER_TOKEN if per_call.get(k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} given without labels: there is no loss to weight")
            return self._call_original(model, *args, **kwargs)
        options = {**self.options, **per_call}

        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        head = model.get_output_embeddings()
        weight, bias = _head_params(head)
        recorded = []
        with _stub_forward(head, recorded):
            out = self._call_original(model, *args, return_dict=True, **kwargs)
        if len(recorded) != 1:
            raise NotImplementedError(
                f"use_fused_loss: {type(model).__name__}'s forward called its LM head {len(recorded)} times; "
                "expected once, on the final hidden states")
        hidden = recorded[0]
        if self.scale is None:
            self.scale = self._measure_scale(model, out)
        if self.scale != 1.0:
            hidden = hidden * self.scale
            bias = None if bias is None else bias * self.scale

        targets = labels if shift_labels is None else shift_labels
        result = sftkey.linear_cross_entropy(
            hidden, weight, targets.to(hidden.device), bias=bias, softcap=self.softcap,
            shift=shift_labels is None, normalizer=normalizer, **options)
        loss, stats = result if options.get("return_stats") else (result, None)
        aux_loss = getattr(out, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + _aux_loss_coef(model) * aux_loss.to(loss.device)

        fields = {k: v for k, v in out.items() if k != "logits"}
        fields["loss"] = loss
        out = type(out)(**fields)
        if stats is not None:
            out["stats"] = stats  # an item, not an attribute: survives accelerate's output conversion
        return out if return_dict else out.to_tuple()

    def _measure_scale(self, model: nn.Module, out) -> float:
        """The factor ``s`` such that the forward turns head outputs ``z`` into
        ``softcap(s * z)``, from the probe values; raise if no ``s`` explains both."""
        logits = getattr(out, "logits", None)
        name = type(model).__name__
        if logits is None or logits.shape[-1] != len(_PROBE):
            raise NotImplementedError(f"use_fused_loss: {name}'s forward does not return its LM head's output "
                                      "as `logits`; cannot check its logit post-processing")
        seen = logits.detach().reshape(-1, len(_PROBE))[0].double().tolist()
        cap = self.softcap
        if cap:
            seen = [cap * math.atanh(v / cap) if abs(v) < cap else math.nan for v in seen]
        scale = seen[0] / _PROBE[0]
        if not math.isclose(seen[1], scale * _PROBE[1], rel_tol=1e-5, abs_tol=1e-6):
            raise NotImplementedError(
                f"use_fused_loss: {name} post-processes its logits with something other than a scale"
                f"{' and the soft-cap ' + str(cap) if cap else ''} (head outputs {_PROBE} became "
                f"{logits.detach().reshape(-1, 2)[0].tolist()}); the fused loss cannot reproduce it")
        return 1.0 if math.isclose(scale, 1.0, rel_tol=1e-6) else scale


def _causal_lm(model: nn.Module) -> nn.Module:
    """The model whose forward to patch: the base model of a PEFT model, else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _unbound(forward, model: nn.Module):
    """``forward`` as ``f(model, *args, **kwargs)``, so that a deep copy of the patched model
    (whose bound method is rebound to the copy) calls its own original forward."""
    if isinstance(forward, types.MethodType) and forward.__self__ is model:
        return forward.__func__
    return lambda _model, *args, **kwargs: forward(*args, **kwargs)


def _signature_with_options(forward) -> inspect.Signature:
    """``forward``'s signature (with ``self``) plus keyword-only :data:`LOSS_OPTIONS`,
    ``shift_labels`` and ``num_items_in_batch``, before any ``**kwargs``."""
    sig = inspect.signature(forward)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
             for n in _EXTRA_KWARGS if n not in sig.parameters]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sig.replace(parameters=[self_param, *params, *extra, *var_kw])


def _head_params(head: nn.Module):
    """``(weight, bias)`` of the LM head; refuses heads that are not one linear map."""
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(
            f"use_fused_loss: the LM head is wrapped by an adapter ({type(head).__name__}); the fused loss "
            "needs it as a plain weight. Leave lm_head out of the adapter's target_modules, or train it "
            "fully with modules_to_save=['lm_head']")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"use_fused_loss: the LM head ({type(head).__name__}) has no floating-point "
                         "[vocab, hidden] weight (quantized heads are not supported)")
    return weight, getattr(head, "bias", None)


@contextmanager
def _stub_forward(head: nn.Module, recorded: list):
    """Within the block, ``head(x)`` records ``x`` and returns the probe, ``[..., 2]`` float32."""
    saved = head.__dict__.get("forward", _MISSING)

    def stub(x, *args, **kwargs):
        recorded.append(x)
        return torch.tensor(_PROBE, dtype=torch.float32, device=x.device).expand(*x.shape[:-1], -1).clone()

    head.forward = stub
    try:
        yield
    finally:
        if saved is _MISSING:
            del head.forward
        else:
            head.forward = saved


def _aux_loss_coef(model: nn.Module) -> float:
    """The MoE load-balancing coefficient the model's forward would use with labels."""
    coef = getattr(model, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(model.config.get_text_config(), "router_aux_loss_coef", None)
    if coef is None:
        raise NotImplementedError(f"use_fused_loss: {type(model).__name__} returns an aux_loss "
                                  "but has no router_aux_loss_coef")
    return coef
