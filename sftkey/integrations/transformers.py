"""Hugging Face causal LMs that compute their training loss with :func:`sftkey.linear_cross_entropy`.

``use_fused_loss(model)`` replaces ``model.forward`` and its LM head's ``forward`` on those
instances (the classes and other instances are untouched). Called with ``labels``, the
patched forward runs the model's own forward while the head's forward records its input and
returns a ``[..., 2]`` probe instead of ``[..., V]`` logits; then it calls the head module
once more on the recorded hidden states, and the head's forward computes the loss from them
and the head's weight and bias. No ``N x V`` tensor exists; ``output.logits`` is None.
Without ``labels`` (generation, inference) the model's and the head's own forwards run.

Because the loss runs inside a call of the head module, whatever wraps that call holds for
the weight it reads: FSDP (``fully_shard``, or FSDP1 with the head in its own unit) gathers
it there, as DeepSpeed ZeRO-3's module hooks do; a weight still sharded or partitioned there
(a tensor-parallel DTensor, a ZeRO-3 stub of ``numel() == 0``) is refused with a
``ValueError``. Nothing is set on or deleted from a module during the call (the switch
between recording and computing is the handle's own state), so ``torch.compile(model)``,
``model.compile()`` and ``Trainer(torch_compile=True)`` trace the patched model; the graph
breaks where the loss itself does. (A forward hook on the LM head also sees the second
call, whose output is the loss.)

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
* the ``"mean"`` divisor: a call's ``normalizer`` (the sum of the weights over the
  accumulation window, as :class:`~sftkey.integrations.trainer.FusedLossMixin` passes it), else
  ``num_items_in_batch`` (``Trainer``'s count of labelled tokens over the window) for a call
  without ``token_weights`` or ``class_weights``. A weighted call with ``num_items_in_batch``
  and no ``normalizer`` (a plain ``Trainer``'s) raises ``ValueError``: a count is not the
  weighted mean's divisor, and the window's weight sum is known to the trainer only;
* an MoE model's ``aux_loss`` is added with its ``router_aux_loss_coef``, as its forward does;
* PEFT models: the base model is patched, so LoRA on the body trains as usual and
  ``modules_to_save=["lm_head"]`` trains the head's copy. An adapter *on* the LM head
  (LoRA etc.) is refused with a ``ValueError`` by ``use_fused_loss``: the fused loss needs
  the head as one matrix.

Loss options (``token_weights``, ``entropy_weights``, ``class_weights``, ``label_smoothing``,
``z_loss``, ``dft``, ``ignore_index``, ``backend``, ``filter_eps``, ``return_stats``) are set
for every call in ``use_fused_loss(model, **options)`` and per call as ``model(...)`` keyword
arguments, which win. With ``return_stats=True`` the output carries ``output.stats``
(:class:`sftkey.LossStats`: ``lse``, ``entropy``, ``target_logprob``, ``correct``, ``predicted``, shaped
like the labels after the shift; last in the tuple with ``return_dict=False``).

A frozen reference model (``use_fused_loss(model, reference_model=ref)``) adds the anchor
of ``linear_cross_entropy(..., anchor=...)`` (``anchor_weight``, ``anchor_kind``): each
labelled call also runs ``ref`` on the same arguments under ``no_grad``, stops it when it
calls its LM head (a forward pre-hook that raises, so no reference logits are formed) and
keeps that head's input, the reference's final hidden states. ASFT is
``use_fused_loss(model, reference_model=ref, dft=True, anchor_weight=0.1)``. The reference's
logits must be its head's output as they are (a config soft-cap or logit scale on the
reference raises ``NotImplementedError``); put it in ``eval()`` mode yourself.

Patch the model itself, before wrapping it in DDP/FSDP. The forward's signature lists the
loss options, so ``Trainer(remove_unused_columns=True)`` keeps a ``token_weights`` column.

A labelled call returns no logits, so a plain ``Trainer``'s ``evaluate()`` with
``compute_metrics`` (and ``predict()``) would hand the metrics empty predictions; a labelled
call inside ``transformers.Trainer.prediction_step`` that asks for predictions raises a
``ValueError`` naming :class:`~sftkey.integrations.trainer.FusedLossMixin`, whose
``prediction_step`` gives the argmax token and the label's log-probability instead.

TRL's ``add_fused_lm_head`` (which ``SFTTrainer`` applies) replaces the patched forward and
computes the plain NLL itself. A patched model then refuses to run its backbone outside the
patched forward, and refuses ``fused_lm_head=True``, each with a ``ValueError`` naming
:class:`sftkey.integrations.trl.FusedSFTTrainer`, TRL's trainer on sftkey's loss.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
import types
from typing import Optional

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

import sftkey
from sftkey.options import LossOptions

__all__ = ["use_fused_loss", "is_patched", "fused_loss_handle", "FusedLossHandle", "LOSS_OPTIONS"]

#: Keyword arguments of ``model(...)`` that go to :func:`sftkey.linear_cross_entropy`: its
#: options (:class:`sftkey.LossOptions`) but those the model itself sets (the label shift,
#: its soft-cap, the Trainer's normalizer, the mean reduction).
LOSS_OPTIONS = tuple(n for n in LossOptions.names() if n not in ("shift", "softcap", "normalizer", "reduction", "anchor"))
_EXTRA_KWARGS = (*LOSS_OPTIONS, "shift_labels", "normalizer", "num_items_in_batch")
_WEIGHTING = ("token_weights", "class_weights")  # the options that make the "mean" divisor a weight sum
_PER_TOKEN = ("token_weights", "entropy_weights")
_PROBE = (1.0, -3.0)
_MISSING = object()
_ATTR = "_sftkey_fused_loss"  # the model's handle; wrappers of the forward (accelerate's autocast) keep it
_HEAD_ATTR = "_sftkey_fused_loss_head"  # the same handle, on the LM head
_TRL_ADVICE = ("TRL's fused LM head (fused_lm_head=True) computes the plain NLL from its own log-probabilities, "
               "without sftkey's options and token weights. Train with sftkey.integrations.trl.FusedSFTTrainer "
               "instead of SFTTrainer: TRL's data pipeline with sftkey's loss")
_MIXIN = ("sftkey.integrations.trainer.FusedLossMixin (sftkey.methods.trainer.SFTKeyTrainer, or "
          "sftkey.integrations.trl.FusedSFTTrainer for TRL)")


def use_fused_loss(model: nn.Module, reference_model: Optional[nn.Module] = None, *, eaft=None,
                   **options) -> "FusedLossHandle":
    """Make ``model`` (a Hugging Face causal LM, or a PEFT model around one) compute its loss
    with :func:`sftkey.linear_cross_entropy` whenever it is called with ``labels``.

    ``options``: defaults for the :data:`LOSS_OPTIONS`. ``reference_model``: a frozen causal
    LM with the same vocabulary whose final hidden states and LM head are the loss's
    ``anchor`` (see the module docstring). ``eaft``: EAFT's settings (a name of
    :data:`sftkey.methods.EAFT_SETTINGS` or an ``EaftSettings``): the loss is
    :func:`sftkey.methods.eaft_loss`. Returns a :class:`FusedLossHandle`;
    ``handle.remove()`` restores the forward, and ``with use_fused_loss(model): ...`` patches
    for the block only.
    """
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"use_fused_loss: unknown options {unknown}; expected any of {list(LOSS_OPTIONS)}")
    anchoring = sorted(k for k in options if k.startswith("anchor_"))
    if anchoring and reference_model is None:
        raise ValueError(f"use_fused_loss: {', '.join(anchoring)} given without a reference_model to anchor to")
    if eaft is not None:
        from sftkey.methods.eaft import eaft_settings
        eaft = eaft_settings(eaft)
    return FusedLossHandle(_causal_lm(model), options,
                           None if reference_model is None else _checked_reference(_causal_lm(reference_model)), eaft)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the base model of a PEFT model) is patched by :func:`use_fused_loss`."""
    return fused_loss_handle(model) is not None


def fused_loss_handle(model: nn.Module) -> Optional["FusedLossHandle"]:
    """The :class:`FusedLossHandle` of ``model`` (or of a PEFT model's base model), or None."""
    handle = getattr(_causal_lm(model), _ATTR, None)
    return handle if isinstance(handle, FusedLossHandle) else None


class FusedLossHandle:
    """The patch of one model's forward and its LM head's; :meth:`remove` (or leaving a
    ``with`` block) undoes it."""

    def __init__(self, model: nn.Module, options: dict, reference: Optional[nn.Module] = None, eaft=None):
        if is_patched(model):
            raise ValueError("use_fused_loss: the model is already patched; remove() the first patch")
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"use_fused_loss: {type(model).__name__} has no output embeddings (LM head)")
        _refuse_adapter(head)
        if isinstance(getattr(head, _HEAD_ATTR, None), FusedLossHandle):
            raise ValueError("use_fused_loss: the LM head is patched by another model's patch; remove() it first")
        self.model, self.head, self.options, self.reference, self.eaft = model, head, options, reference, eaft
        self._saved = model.__dict__.get("forward", _MISSING)
        self._head_saved = head.__dict__.get("forward", _MISSING)
        self._call_original = _unbound(model.forward, model)
        self._call_head = _unbound(head.forward, head)
        config = model.config.get_text_config()
        self.softcap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None)
        self.scale: Optional[float] = None  # measured on the first labelled call
        self._step = None  # what the head's forward does instead of its own: record, or compute the loss
        self._active = False  # within the patched forward

        def forward(module, *args, **kwargs):  # a deep copy of the model calls its own handle
            return getattr(module, _ATTR)._forward(module, *args, **kwargs)

        def head_forward(module, *args, **kwargs):
            return getattr(module, _HEAD_ATTR)._head_forward(module, *args, **kwargs)

        forward.__signature__ = _signature_with_options(model.forward)
        forward.__doc__ = type(model).forward.__doc__
        self._installed = forward
        model.forward = types.MethodType(forward, model)
        head.forward = types.MethodType(head_forward, head)
        setattr(model, _ATTR, self)
        setattr(head, _HEAD_ATTR, self)
        backbone = getattr(model, "base_model", model)
        self._bypass_hook = None if backbone is model else backbone.register_forward_pre_hook(
            functools.partial(_refuse_bypass, self))

    def remove(self) -> None:
        """Restore the forwards the model and its LM head had before :func:`use_fused_loss`."""
        if getattr(self.model, _ATTR, None) is not self:
            return
        for module, attr, saved in ((self.model, _ATTR, self._saved), (self.head, _HEAD_ATTR, self._head_saved)):
            delattr(module, attr)
            if saved is _MISSING:
                del module.forward
            else:
                module.forward = saved
        if self._bypass_hook is not None:
            self._bypass_hook.remove()

    def __enter__(self) -> "FusedLossHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def loss_inputs(self, inputs: dict) -> Optional[tuple[Tensor, bool, dict]]:
        """``(targets, shift, options)`` of a call ``model(**inputs)`` as the patched forward
        reads them: ``shift_labels`` as given, else ``labels`` to be shifted, and the loss
        options (the call's, else the patch's); None without labels."""
        shift_labels, labels = inputs.get("shift_labels"), inputs.get("labels")
        if labels is None and shift_labels is None:
            return None
        options = {**self.options, **{k: inputs[k] for k in LOSS_OPTIONS if k in inputs}}
        return (labels, True, options) if shift_labels is None else (shift_labels, False, options)

    def _forward(self, model: nn.Module, *args, **kwargs):
        if kwargs.pop("fused_lm_head", False):
            raise ValueError(f"use_fused_loss: {type(model).__name__} was called with fused_lm_head=True. " + _TRL_ADVICE)
        previous, self._active = self._active, True
        try:
            return self._patched_forward(model, *args, **kwargs)
        finally:
            self._active = previous

    def _patched_forward(self, model: nn.Module, *args, **kwargs):
        found = self.loss_inputs(kwargs)
        given = [k for k in _PER_TOKEN if kwargs.get(k) is not None]
        for name in ("labels", "shift_labels", *LOSS_OPTIONS):
            kwargs.pop(name, None)
        normalizer, count = kwargs.pop("normalizer", None), kwargs.pop("num_items_in_batch", None)
        if found is None:
            if given:
                raise ValueError(f"{', '.join(given)} given without labels: there is no loss to weight")
            return self._call_original(model, *args, **kwargs)
        targets, shift, options = found
        normalizer = _mean_divisor(normalizer, count, options)
        if not torch.is_grad_enabled():
            _refuse_trainer_predictions(model)

        _refuse_adapter(model.get_output_embeddings())  # one put on the head after patching
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        recorded = []
        out = self._with_step(functools.partial(_record, recorded), self._call_original, model, *args,
                              return_dict=True, **kwargs)
        if len(recorded) != 1:
            raise NotImplementedError(
                f"use_fused_loss: {type(model).__name__}'s forward called its patched LM head {len(recorded)} times; "
                "expected once, on the final hidden states (was the head replaced after use_fused_loss?)")
        if self.scale is None:
            self.scale = self._measure_scale(model, out)

        # The loss runs inside a call of the head module, so that whatever wraps the head's forward
        # (FSDP's unshard, DeepSpeed ZeRO-3's gather, accelerate's offload) holds for the weight it
        # reads. The hidden states reach it through the step; the call's argument is a detached copy,
        # as FSDP2 would hook the reduction of the head's gradient on a differentiable argument's
        # backward, before the embedding's share of a tied weight arrives (a unit of both modules).
        if self.reference is not None:
            options = {**options, "anchor": _reference_head(self.reference, recorded[0].device, args, kwargs)}
        ran = []
        loss_step = functools.partial(self._head_loss, ran, recorded[0], targets, shift, normalizer, options)
        result = self._with_step(loss_step, model.get_output_embeddings(), recorded[0].detach())
        if not ran:
            raise ValueError(f"use_fused_loss: {type(model).__name__}'s LM head is no longer the module that was "
                             "patched (replaced after use_fused_loss?); remove() the patch and patch again")
        loss, stats = result if options.get("return_stats") else (result, None)
        aux_loss = getattr(out, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + _aux_loss_coef(model) * aux_loss.to(loss.device)

        fields = {k: v for k, v in out.items() if k != "logits"}
        fields["loss"] = loss
        if stats is None:
            out = type(out)(**fields)
        else:  # a field of its own: DDP and accelerate rebuild outputs from their fields
            out = _with_stats_field(type(out))(**fields, stats=stats)
        return out if return_dict else out.to_tuple()

    def _with_step(self, step, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` with the LM head's forward replaced by ``step(head, *head_args)``."""
        self._step = step
        try:
            return fn(*args, **kwargs)
        finally:
            self._step = None

    def _head_forward(self, head: nn.Module, *args, **kwargs):
        """The LM head's forward while patched: its own, or the step of the patched model forward."""
        step = self._step
        if step is None:
            return self._call_head(head, *args, **kwargs)
        return step(head, *args, **kwargs)

    def _head_loss(self, ran: list, hidden: Tensor, targets: Tensor, shift: bool, normalizer, options: dict,
                   head: nn.Module, _detached: Tensor):
        """The fused loss of ``hidden``, from within a call of the LM head module."""
        ran.append(True)
        weight, bias = _head_params(head)
        if self.scale != 1.0:
            hidden = hidden * self.scale
            bias = None if bias is None else bias * self.scale
        loss = sftkey.linear_cross_entropy
        if self.eaft is not None:
            from sftkey.methods.eaft import eaft_loss
            loss = functools.partial(eaft_loss, settings=self.eaft)
        return loss(hidden, weight, targets.to(hidden.device), bias=bias, softcap=self.softcap, shift=shift,
                    normalizer=normalizer, **options)

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


def _mean_divisor(normalizer, count, options: dict):
    """The ``"mean"`` divisor of a labelled call: ``normalizer`` as given, else Trainer's
    ``num_items_in_batch`` ``count`` (labelled tokens) where nothing weights the tokens (None:
    the loss's own ``sum_i a_i w_{y_i}``)."""
    if normalizer is not None or count is None:
        return normalizer
    weighting = [k for k in _WEIGHTING if options.get(k) is not None]
    if weighting:
        raise ValueError(
            f"use_fused_loss: {', '.join(weighting)} with num_items_in_batch and no normalizer. Trainer's "
            "num_items_in_batch counts the labelled tokens; the weighted mean divides by the sum of the weights over "
            "the accumulation window, which only the trainer sees, so the loss would change scale. Train with "
            f"{_MIXIN}, which passes that sum as normalizer; in a loop of your own, pass normalizer= "
            "(sftkey.distributed.weight_total, or global_normalizer across ranks)")
    return count


@torch.compiler.disable
def _refuse_trainer_predictions(model: nn.Module) -> None:
    """Raise where ``transformers.Trainer.prediction_step`` (its own code, not an override's)
    called the patched model for predictions: it would hand ``compute_metrics`` an empty tuple."""
    trainer = sys.modules.get("transformers.trainer")
    step = getattr(getattr(getattr(trainer, "Trainer", None), "prediction_step", None), "__code__", None)
    frame = sys._getframe(1)
    while step is not None and frame is not None:
        if frame.f_code is step:
            if not frame.f_locals.get("prediction_loss_only", True):
                raise ValueError(
                    f"use_fused_loss: Trainer.prediction_step (evaluate() with compute_metrics, or predict()) asked "
                    f"{type(model).__name__} for logits, and a patched model returns none with labels, so "
                    f"compute_metrics would get empty predictions. Use {_MIXIN}: its evaluate() hands compute_metrics "
                    "the argmax token and the label's log-probability per position; or evaluate without "
                    "compute_metrics (the loss only)")
            return
        frame = frame.f_back


class _AtHead(Exception):
    """Raised by an LM head's pre-hook: its input, the final hidden states."""

    def __init__(self, hidden: Tensor):
        super().__init__("stopped at the LM head")
        self.hidden = hidden


def _stop_at_head(_head: nn.Module, args) -> None:
    raise _AtHead(args[0])


def hidden_at_head(head: nn.Module, run) -> Optional[Tensor]:
    """The hidden states ``head`` receives when ``run()`` calls the model, which stops there (no
    logits are formed); ``None`` where the model never calls ``head``."""
    hook = head.register_forward_pre_hook(_stop_at_head)
    try:
        run()
    except _AtHead as stop:
        return stop.hidden
    finally:
        hook.remove()
    return None


#: Config attributes of Hugging Face models that post-process the LM head's logits (soft-caps,
#: scales): where one is set, the logits are not the head's output as they are.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logits_soft_cap", "logit_scale", "logits_scaling",
                        "lm_head_multiplier")


def _checked_reference(reference: nn.Module) -> nn.Module:
    """``reference``, refused where its logits are not its head's output as they are."""
    head = reference.get_output_embeddings()
    if head is None:
        raise ValueError(f"use_fused_loss: the reference model {type(reference).__name__} has no LM head")
    _refuse_adapter(head)
    config = reference.config.get_text_config()
    for name in LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"use_fused_loss: the reference model's config sets {name}={value}; a "
                                      "reference whose logits are post-processed is not supported")
    return reference


def _reference_head(reference: nn.Module, device: torch.device, args, kwargs) -> tuple:
    """``(ref_hidden, ref_weight[, ref_bias])`` of ``reference`` on the call's arguments: its
    body under ``no_grad``, stopped before its LM head."""
    head = reference.get_output_embeddings()
    with torch.no_grad():
        hidden = hidden_at_head(head, lambda: reference(*args, **kwargs))
    if hidden is None:
        raise NotImplementedError(f"use_fused_loss: the reference model {type(reference).__name__}'s forward did "
                                  "not call its LM head")
    weight, bias = _head_params(head)
    parts = (hidden.detach().to(device), weight.detach().to(device))
    return parts if bias is None else (*parts, bias.detach().to(device))


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
    ``shift_labels``, ``normalizer`` and ``num_items_in_batch``, before any ``**kwargs``."""
    sig = inspect.signature(forward)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
             for n in _EXTRA_KWARGS if n not in sig.parameters]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sig.replace(parameters=[self_param, *params, *extra, *var_kw])


def _refuse_adapter(head: nn.Module) -> None:
    """Refuse an LM head wrapped by an adapter (LoRA etc.): the fused loss needs one matrix."""
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(
            f"use_fused_loss: the LM head is wrapped by an adapter ({type(head).__name__}); the fused loss "
            "needs it as a plain weight. Leave lm_head out of the adapter's target_modules, or train it "
            "fully with modules_to_save=['lm_head']")


def _head_params(head: nn.Module):
    """``(weight, bias)`` of the LM head, as its forward sees them; refuses heads that are not
    one linear map, and weights that are still sharded there."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, DTensor):
        raise ValueError(
            f"use_fused_loss: the LM head's weight is a DTensor ({weight.placements}) inside the head's own "
            "forward, so it is split across ranks there (tensor parallelism); the fused loss needs the whole "
            "[vocab, hidden] matrix. Leave the head out of the tensor-parallel plan, or compute the loss with "
            "sftkey.distributed.vocab_parallel_linear_cross_entropy")
    if isinstance(weight, Tensor) and weight.numel() == 0:
        raise ValueError(
            f"use_fused_loss: the LM head's weight is empty (shape {tuple(weight.shape)}) inside the head's own "
            "forward: a partitioned stub, as DeepSpeed ZeRO-3 leaves it where no hook gathers it. Let the head "
            "module's forward hooks gather its parameters (do not remove them), or train without ZeRO-3")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"use_fused_loss: the LM head ({type(head).__name__}) has no floating-point "
                         "[vocab, hidden] weight (quantized heads are not supported)")
    return weight, getattr(head, "bias", None)


def _record(recorded: list, head: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """The head's step while the model's own forward runs: record ``x``, return the probe
    ``[..., 2]`` float32 instead of ``[..., V]`` logits."""
    recorded.append(x)
    return torch.tensor(_PROBE, dtype=torch.float32, device=x.device).expand(*x.shape[:-1], -1).clone()


def _refuse_bypass(handle: "FusedLossHandle", backbone: nn.Module, args) -> None:
    """Forward pre-hook of the backbone: refuse a run that reaches it outside the patched
    forward because something replaced that forward after :func:`use_fused_loss` (TRL's
    ``add_fused_lm_head``, which ``SFTTrainer`` applies, computes its own loss there)."""
    forward = handle.model.forward
    if handle._active or _wraps(forward, handle._installed):
        return
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    by = f" (by {code.co_name} in {code.co_filename})" if code is not None else ""
    raise ValueError(
        f"use_fused_loss: {type(handle.model).__name__}'s forward was replaced after use_fused_loss{by}, "
        "and its backbone now runs outside it: the loss would not be sftkey's. " + _TRL_ADVICE)


def _wraps(forward, function) -> bool:
    """Whether ``forward`` is ``function``, or wraps it (``functools.wraps`` chains, bound methods)."""
    seen = getattr(forward, "__func__", forward)
    while seen is not None:
        if seen is function:
            return True
        seen = getattr(seen, "__wrapped__", None)
    return False


_WITH_STATS: dict[type, type] = {}  # a plain dict: Dynamo traces through functools caches


def _with_stats_field(output_type: type) -> type:
    """``output_type`` (a ``ModelOutput`` dataclass) with a last field ``stats``, made once; the
    same name, in a module of its own (``ModelOutput`` registers each subclass by module and name)."""
    made = _WITH_STATS.get(output_type)
    if made is None:
        made = _WITH_STATS[output_type] = dataclasses.make_dataclass(
            output_type.__name__, [("stats", Optional[sftkey.LossStats], None)], bases=(output_type,),
            namespace={"__module__": f"{__name__}.{output_type.__module__}"})
    return made


def _aux_loss_coef(model: nn.Module) -> float:
    """The MoE load-balancing coefficient the model's forward would use with labels."""
    coef = getattr(model, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(model.config.get_text_config(), "router_aux_loss_coef", None)
    if coef is None:
        raise NotImplementedError(f"use_fused_loss: {type(model).__name__} returns an aux_loss "
                                  "but has no router_aux_loss_coef")
    return coef
