"""Hugging Face ``Trainer`` on the fused loss: :class:`FusedLossMixin`, in front of ``Trainer``
or of a subclass (``SFTKeyTrainer``; TRL's through :mod:`sftkey.integrations.trl`).

The model computes its loss with :func:`sftkey.integrations.transformers.use_fused_loss`
(applied at construction when the model is not patched yet), so no ``N x V`` logits are
built. Like TRL's ``SFTTrainer``, the trainer logs ``entropy`` (mean over trained tokens) and
``mean_token_accuracy`` (argmax equals the label), here from the loss's ``return_stats``.
Batches may carry ``token_weights`` and ``entropy_weights``
(:class:`sftkey.methods.data.TokenWeightCollator` pads or flattens them); they reach the loss
through ``model(...)``. ``args.label_smoothing_factor`` becomes the fused loss's
``label_smoothing``.

The loss is the weighted mean of the whole step: the sum of the token weights of the
labelled tokens over the accumulation window and the ranks is passed to the model as its
``normalizer``, so ``train()``, ``evaluate()`` and ``model(**batch)`` agree (a plain
``Trainer`` passes a count of labelled tokens, which the patched model refuses for weighted
batches). ``evaluate()`` hands ``compute_metrics`` the argmax token and the target's
log-probability per position instead of logits (:meth:`FusedLossMixin.prediction_step`);
token accuracy and perplexity::

    def compute_metrics(pred):
        predicted, logprob = pred.predictions           # [B, T] each, like pred.label_ids
        mask = pred.label_ids[:, 1:] != -100            # position t predicts label t + 1
        return {"token_accuracy": (predicted[:, :-1] == pred.label_ids[:, 1:])[mask].mean(),
                "perplexity": np.exp(-logprob[:, :-1][mask].mean())}
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Optional

import torch
from transformers import Trainer

from ..core.inputs import flat_targets
from ..distributed import weight_total
from ..options import LossOptions
from .transformers import fused_loss_handle, is_patched, use_fused_loss

__all__ = ["FusedLossMixin", "WEIGHT_COLUMNS"]

#: The per-token columns a batch may carry to the loss.
WEIGHT_COLUMNS = ("token_weights", "entropy_weights")


class FusedLossMixin:
    """``compute_loss``, ``prediction_step`` and ``log`` for a ``Trainer`` (or TRL ``SFTTrainer``)
    subclass: the loss from the patched model's forward, ``entropy`` and
    ``mean_token_accuracy`` from its stats, without logits.

    * The ``"mean"`` denominator under gradient accumulation is exact for weighted batches:
      Trainer's ``num_items_in_batch`` becomes the sum of ``a_i w_{y_i}`` (token weights times
      class weights) over the labelled tokens of the whole accumulation window, summed over
      the data-parallel ranks when ``average_tokens_across_devices`` (the labelled count when
      nothing is weighted, as Trainer counts), and reaches the model as its ``normalizer``.
      Training and ``evaluate()`` then report the loss that ``model(**batch)`` gives for the
      same tokens.
    * The loss options the training arguments set come from :meth:`args_loss_options`
      (``label_smoothing_factor``); a TRL ``SFTConfig``'s ``loss_type`` is read by
      :class:`sftkey.integrations.trl.FusedSFTTrainer` only, and refused here.
    * ``evaluate()`` with ``compute_metrics``: the predictions are ``(predicted,
      target_logprob)`` (see :meth:`prediction_step`).
    * A batch that lacks the ``token_weights`` / ``entropy_weights`` its dataset's features
      have (dropped by ``remove_unused_columns`` or by the collator) raises ``ValueError``.
    * ``reference_model`` (a frozen causal LM on the model's device) and ``loss_options`` (the
      defaults of :func:`~sftkey.integrations.transformers.use_fused_loss`) go to the patch made
      here. ASFT: ``SFTKeyTrainer(..., reference_model=ref, loss_options=dict(dft=True,
      anchor_weight=0.1))``; EAFT: ``loss_options=dict(eaft="llamafactory")``.
    """

    def __init__(self, *args, reference_model=None, loss_options: Optional[Mapping[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        from_args = self.args_loss_options()
        self.label_smoother = None  # it would need logits; the fused loss smooths instead
        loss_options = dict(loss_options or {})
        if not is_patched(self.model):
            _refuse_differences(from_args, loss_options, "loss_options")
            use_fused_loss(self.model, reference_model=reference_model, **{**from_args, **loss_options})
        elif reference_model is not None or loss_options:
            raise ValueError("reference_model, loss_options: the model is already patched; pass them to "
                             "use_fused_loss instead")
        else:
            defaults = LossOptions()
            patched = fused_loss_handle(self.model).options
            _refuse_differences(from_args, {k: patched.get(k, getattr(defaults, k)) for k in from_args},
                                "the model's use_fused_loss patch")
        self._fused_loss = fused_loss_handle(self.model)
        self._weight_columns = {"train": set(), "eval": set()}
        if not hasattr(self, "_metrics"):
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def args_loss_options(self) -> dict[str, Any]:
        """The loss options that ``self.args`` sets: ``label_smoothing`` from
        ``label_smoothing_factor``. A ``loss_type`` (TRL's ``SFTConfig``) raises ``TypeError``:
        this mixin would not read it."""
        loss_type = getattr(self.args, "loss_type", None)
        if loss_type is not None:
            raise TypeError(f"args.loss_type={loss_type!r}: FusedLossMixin does not read TRL's loss_type, so the "
                            "loss would not be the one asked for. Train with sftkey.integrations.trl.FusedSFTTrainer")
        smoothing = self.args.label_smoothing_factor
        return {"label_smoothing": smoothing} if smoothing else {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        missing = sorted(self._weight_columns[mode] - set(inputs))
        if missing:
            raise ValueError(
                f"{', '.join(missing)}: the dataset's features have it but the batch does not, so the loss would "
                "ignore it. Trainer's remove_unused_columns or the data collator dropped it: pass "
                "remove_unused_columns=False and data_collator=sftkey.methods.data.TokenWeightCollator(...)")
        # num_items_in_batch (the weighted denominator, see _get_num_items_in_batch) is the loss's
        # normalizer, and Trainer's compute_loss scales the loss across ranks by it
        inputs = {**inputs, "return_stats": True}
        if num_items_in_batch is not None:
            inputs["normalizer"] = num_items_in_batch
        loss, outputs = self.model_loss(model, inputs, num_items_in_batch)
        self._record_stats(outputs["stats"], inputs, mode)
        return (loss, outputs) if return_outputs else loss

    def model_loss(self, model, inputs: dict, num_items_in_batch):
        """``(loss, outputs)`` of the patched model on ``inputs``: ``Trainer``'s own ``compute_loss``
        (a trainer whose ``compute_loss`` prepares inputs around it may call that one instead)."""
        return Trainer.compute_loss(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``(loss, predictions, labels)`` of one evaluation batch, without logits.

        ``predictions`` is ``(predicted, target_logprob)``, each shaped like the batch's labels
        (``shift_labels`` where given): ``predicted[b, t]`` is the argmax token of position
        ``t`` (int64, for every position), which predicts ``labels[b, t + 1]`` (as
        ``logits.argmax(-1)`` would be); ``target_logprob[b, t]`` is ``log p(labels[b, t + 1])``,
        0 where that label is ignored. ``compute_metrics`` receives them as
        ``EvalPrediction.predictions`` (numpy, batches padded with -100). Batches without
        labels take Trainer's own step."""
        inputs = self._prepare_inputs(inputs)
        found = self._fused_loss.loss_inputs(inputs)
        if found is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        with torch.no_grad(), self.compute_loss_context_manager():
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True,
                                              num_items_in_batch=num_items_in_batch)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        stats = outputs["stats"]
        return loss, (stats.predicted, stats.target_logprob), found[0]

    def _get_num_items_in_batch(self, batch_samples, device):
        """Trainer's ``num_items_in_batch`` (when it passes one), as the weighted mean's denominator."""
        count = super()._get_num_items_in_batch(batch_samples, device)
        if count is None:
            return None
        total = sum(self._weight_total(batch).to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        elif self.args.n_gpu > 1:
            raise ValueError("FusedLossMixin does not support nn.DataParallel (several GPUs in one process); "
                             "launch one process per GPU with torchrun or accelerate")
        total = total / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())
        return torch.where(total == 0, torch.ones_like(total), total)

    def _weight_total(self, batch: dict[str, Any]) -> torch.Tensor:
        """The weighted-mean denominator of one batch's loss alone (float64 scalar)."""
        targets, shift, options = self._fused_loss.loss_inputs(batch)
        return weight_total(targets, token_weights=options.get("token_weights"),
                            class_weights=options.get("class_weights"),
                            ignore_index=options.get("ignore_index", -100), shift=shift)

    def _record_stats(self, stats, inputs: dict[str, Any], mode: str) -> None:
        """Append this batch's mean entropy and token accuracy over its trained tokens."""
        targets, shift, options = self._fused_loss.loss_inputs(inputs)
        y = flat_targets(targets, options.get("ignore_index", -100), shift).reshape(targets.shape)
        trained = (y >= 0).to(stats.entropy.device)
        gather = self.accelerator.gather_for_metrics
        count = gather(trained.sum()).sum()
        entropy = gather(stats.entropy.detach()[trained].sum()).sum()
        correct = gather(stats.correct[trained].sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / count).item() if count > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

    def get_train_dataloader(self):
        self._weight_columns["train"] = _weight_columns(self.train_dataset)
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        self._weight_columns["eval"] = _weight_columns(
            self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else dataset)
        return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        self._weight_columns["eval"] = _weight_columns(test_dataset)
        return super().get_test_dataloader(test_dataset)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        super().log(logs, start_time)


def _refuse_differences(from_args: dict, given: dict, where: str) -> None:
    """``ValueError`` where ``given`` sets an option that the training arguments set otherwise."""
    differ = {k: (v, given[k]) for k, v in from_args.items() if k in given and given[k] != v}
    if differ:
        raise ValueError(f"{where} set {', '.join(f'{k}={g!r}' for k, (_, g) in differ.items())} where the training "
                         f"arguments give {', '.join(f'{k}={a!r}' for k, (a, _) in differ.items())}; the logged "
                         "configuration would not be the loss trained. Set it in the training arguments (loss_type, "
                         "label_smoothing_factor)")


def _weight_columns(dataset) -> set[str]:
    """Which of :data:`WEIGHT_COLUMNS` the dataset's features have (a ``datasets.Dataset``'s
    columns, else the first feature's keys; none if unknown)."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        try:
            first = dataset[0]
        except (TypeError, IndexError, KeyError, NotImplementedError):  # iterable, or empty: nothing to check
            return set()
        names = first.keys() if isinstance(first, Mapping) else ()
    return set(WEIGHT_COLUMNS) & set(names)
