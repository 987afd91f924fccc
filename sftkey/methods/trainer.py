"""Hugging Face ``Trainer`` on the fused loss, and SFTKey's two training stages.

:class:`SFTKeyTrainer` is a ``transformers.Trainer`` whose model computes its loss with
:func:`sftkey.integrations.transformers.use_fused_loss` (applied at construction when the
model is not patched yet), so no ``N x V`` logits are built. Like TRL's ``SFTTrainer``, it
logs ``entropy`` (mean over trained tokens) and ``mean_token_accuracy`` (argmax equals the
label), here from the loss's ``return_stats``. Batches may carry ``token_weights`` and
``entropy_weights`` (:class:`sftkey.methods.data.TokenWeightCollator` pads them); they reach the
loss through ``model(...)``. ``args.label_smoothing_factor`` becomes the fused loss's
``label_smoothing``.

SFTKey (stage 1 on every response token, then stage 2 on the key answer tokens with the
chain of thought as context) is two :class:`Stage` s run by :meth:`SFTKeyTrainer.train_stages`
on the same model, each with its own dataset (from :func:`sftkey.methods.keys.build_features` with
``stage=1`` / ``stage=2``), epochs and learning rate, and a fresh optimizer state and
schedule::

    s1, _ = keys.build_features(tok, examples, stage=1)
    s2, _ = keys.build_features(tok, examples, stage=2)
    trainer = SFTKeyTrainer(model=model, args=TrainingArguments("out", per_device_train_batch_size=8),
                            data_collator=TokenWeightCollator.from_tokenizer(tok))
    trainer.train_stages(Stage(s1, num_train_epochs=3, learning_rate=1e-5),
                         Stage(s2, num_train_epochs=1, learning_rate=5e-6))

With TRL's ``SFTTrainer``: TRL >= 1.x puts its own fused LM head on the model and takes the
plain NLL from it, so token weights would be ignored. Put :class:`FusedLossMixin` in front of
it, pass the pre-tokenized features and sftkey's collator, and keep the extra columns::

    class FusedSFTTrainer(FusedLossMixin, SFTTrainer):
        pass

    trainer = FusedSFTTrainer(
        model=model, processing_class=tok, train_dataset=Dataset.from_list(s2),
        data_collator=TokenWeightCollator.from_tokenizer(tok),
        args=SFTConfig("out", remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}))

Without the mixin, a model patched by ``use_fused_loss`` refuses to train under ``SFTTrainer``
(a ``ValueError`` at the first step names the mixin) instead of training on TRL's plain NLL;
the mixin refuses batches that lack the ``token_weights`` their dataset's features have (as
TRL's default collator or ``remove_unused_columns=True`` leave them). (TRL's
``loss_type="dft"`` equals ``dft=True`` here.)

The loss is the weighted mean of the whole step: ``num_items_in_batch`` becomes the sum of
the token weights of the labelled tokens over the accumulation window and the ranks, so
``train()``, ``evaluate()`` and ``model(**batch)`` agree. ``evaluate()`` hands
``compute_metrics`` the argmax token and the target's log-probability per position instead
of logits (:meth:`FusedLossMixin.prediction_step`); token accuracy and perplexity::

    def compute_metrics(pred):
        predicted, logprob = pred.predictions           # [B, T] each, like pred.label_ids
        mask = pred.label_ids[:, 1:] != -100            # position t predicts label t + 1
        return {"token_accuracy": (predicted[:, :-1] == pred.label_ids[:, 1:])[mask].mean(),
                "perplexity": np.exp(-logprob[:, :-1][mask].mean())}
"""
from __future__ import annotations

import copy
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from ..distributed import weight_total
from ..core.inputs import flat_targets
from ..integrations.transformers import fused_loss_handle, is_patched, use_fused_loss

__all__ = ["FusedLossMixin", "SFTKeyTrainer", "Stage"]


class FusedLossMixin:
    """``compute_loss``, ``prediction_step`` and ``log`` for a ``Trainer`` (or TRL ``SFTTrainer``)
    subclass: the loss from the patched model's forward, ``entropy`` and
    ``mean_token_accuracy`` from its stats, without logits.

    * The ``"mean"`` denominator under gradient accumulation is exact for weighted batches:
      Trainer's ``num_items_in_batch`` becomes the sum of ``a_i w_{y_i}`` (token weights times
      class weights) over the labelled tokens of the whole accumulation window, summed over
      the data-parallel ranks when ``average_tokens_across_devices`` (the labelled count when
      nothing is weighted, as Trainer counts). Training and ``evaluate()`` then report the
      loss that ``model(**batch)`` gives for the same tokens.
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
        options = dict(loss_options or {})
        if self.label_smoother is not None:  # it would need logits; the fused loss smooths instead
            options["label_smoothing"] = self.args.label_smoothing_factor
            self.label_smoother = None
        if not is_patched(self.model):
            use_fused_loss(self.model, reference_model=reference_model, **options)
        elif reference_model is not None or loss_options:
            raise ValueError("reference_model, loss_options: the model is already patched; pass them to "
                             "use_fused_loss instead")
        elif options:
            raise ValueError("label_smoothing_factor: the model is already patched; pass "
                             "label_smoothing to use_fused_loss instead")
        self._fused_loss = fused_loss_handle(self.model)
        self._weight_columns = {"train": set(), "eval": set()}
        if not hasattr(self, "_metrics"):
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        missing = sorted(self._weight_columns[mode] - set(inputs))
        if missing:
            raise ValueError(
                f"{', '.join(missing)}: the dataset's features have it but the batch does not, so the loss would "
                "ignore it. Trainer's remove_unused_columns or the data collator dropped it: pass "
                "remove_unused_columns=False and data_collator=sftkey.methods.data.TokenWeightCollator(...)")
        # Trainer's own compute_loss (not TRL's): the model's loss, num_items_in_batch passed on
        loss, outputs = Trainer.compute_loss(self, model, {**inputs, "return_stats": True}, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        self._record_stats(outputs["stats"], inputs, mode)
        return (loss, outputs) if return_outputs else loss

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


def _weight_columns(dataset) -> set[str]:
    """Which of ``token_weights`` / ``entropy_weights`` the dataset's features have (a
    ``datasets.Dataset``'s columns, else the first feature's keys; none if unknown)."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        try:
            first = dataset[0]
        except (TypeError, IndexError, KeyError, NotImplementedError):  # iterable, or empty: nothing to check
            return set()
        names = first.keys() if isinstance(first, Mapping) else ()
    return {"token_weights", "entropy_weights"} & set(names)


@dataclass
class Stage:
    """One training stage: its dataset, epochs (or ``max_steps`` > 0, which wins) and peak
    learning rate (None: the trainer's ``args.learning_rate``). ``name`` is the subfolder of
    ``args.output_dir`` for the stage's checkpoints."""

    train_dataset: Any
    num_train_epochs: float = 1.0
    learning_rate: Optional[float] = None
    max_steps: int = -1
    name: Optional[str] = None


class SFTKeyTrainer(FusedLossMixin, Trainer):
    """A ``transformers.Trainer`` on the fused loss that can run training stages in turn."""

    def train_stages(self, *stages: Stage, **train_kwargs) -> list[TrainOutput]:
        """Train on each stage in order, the same model throughout; each stage gets a fresh
        optimizer state and learning-rate schedule. ``train_kwargs`` go to every ``train()``."""
        base_args, outputs = self.args, []
        try:
            for i, stage in enumerate(stages, 1):
                # a shallow copy: constructing new TrainingArguments would reset accelerate's state
                self.args = copy.copy(base_args)
                self.args.num_train_epochs, self.args.max_steps = stage.num_train_epochs, stage.max_steps
                if stage.learning_rate is not None:
                    self.args.learning_rate = stage.learning_rate
                self.args.output_dir = os.path.join(base_args.output_dir, stage.name or f"stage{i}")
                self.train_dataset = stage.train_dataset
                self._reset_optimizer(self.args.learning_rate)
                outputs.append(self.train(**train_kwargs))
        finally:
            self.args = base_args
        return outputs

    def _reset_optimizer(self, learning_rate: float) -> None:
        """Zero the optimizer's state and set its learning rate (Trainer rebuilds the schedule)."""
        if self.optimizer is None:
            return
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = learning_rate
