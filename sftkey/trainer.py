"""Hugging Face ``Trainer`` on the fused loss, and SFTKey's two training stages.

:class:`SFTKeyTrainer` is a ``transformers.Trainer`` whose model computes its loss with
:func:`sftkey.integrations.transformers.use_fused_loss` (applied at construction when the
model is not patched yet), so no ``N x V`` logits are built. Like TRL's ``SFTTrainer``, it
logs ``entropy`` (mean over trained tokens) and ``mean_token_accuracy`` (argmax equals the
label), here from the loss's ``return_stats``. Batches may carry ``token_weights`` and
``entropy_weights`` (:class:`sftkey.data.TokenWeightCollator` pads them); they reach the
loss through ``model(...)``. ``args.label_smoothing_factor`` becomes the fused loss's
``label_smoothing``.

SFTKey (stage 1 on every response token, then stage 2 on the key answer tokens with the
chain of thought as context) is two :class:`Stage` s run by :meth:`SFTKeyTrainer.train_stages`
on the same model, each with its own dataset (from :func:`sftkey.keys.build_features` with
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

Without the mixin, ``use_fused_loss(model, dft=True)`` before ``SFTTrainer`` changes nothing
there: TRL calls its own head. (TRL's ``loss_type="dft"`` equals ``dft=True`` here.)
"""
from __future__ import annotations

import copy
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from .inputs import flat_targets
from .integrations.transformers import is_patched, use_fused_loss

__all__ = ["FusedLossMixin", "SFTKeyTrainer", "Stage"]


class FusedLossMixin:
    """``compute_loss`` and ``log`` for a ``Trainer`` (or TRL ``SFTTrainer``) subclass: the loss
    from the patched model's forward, ``entropy`` and ``mean_token_accuracy`` from its stats."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = {}
        if self.label_smoother is not None:  # it would need logits; the fused loss smooths instead
            options["label_smoothing"] = self.args.label_smoothing_factor
            self.label_smoother = None
        if not is_patched(self.model):
            use_fused_loss(self.model, **options)
        elif options:
            raise ValueError("label_smoothing_factor: the model is already patched; pass "
                             "label_smoothing to use_fused_loss instead")
        if not hasattr(self, "_metrics"):
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's own compute_loss (not TRL's): the model's loss, num_items_in_batch passed on
        loss, outputs = Trainer.compute_loss(self, model, {**inputs, "return_stats": True}, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        self._record_stats(outputs.stats, inputs)
        return (loss, outputs) if return_outputs else loss

    def _record_stats(self, stats, inputs: dict[str, Any]) -> None:
        """Append this batch's mean entropy and token accuracy over its trained tokens."""
        mode = "train" if self.model.training else "eval"
        trained = _trained_tokens(inputs).to(stats.entropy.device)
        gather = self.accelerator.gather_for_metrics
        count = gather(trained.sum()).sum()
        entropy = gather(stats.entropy.detach()[trained].sum()).sum()
        correct = gather(stats.correct[trained].sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / count).item() if count > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        super().log(logs, start_time)


def _trained_tokens(inputs: dict[str, Any]) -> torch.Tensor:
    """Bool mask of the predictions that have a target, shaped like the labels (shifted)."""
    labels = inputs.get("shift_labels")
    shift = labels is None
    if shift:
        labels = inputs["labels"]
    return (flat_targets(labels, -100, shift) >= 0).reshape(labels.shape)


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
