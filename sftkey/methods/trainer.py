"""SFTKey's two training stages on the fused loss: :class:`SFTKeyTrainer` and :class:`Stage`.

:class:`SFTKeyTrainer` is a ``transformers.Trainer`` with
:class:`~sftkey.integrations.trainer.FusedLossMixin` (re-exported here): the model computes its
loss with :func:`sftkey.integrations.transformers.use_fused_loss`, the weighted mean is exact
under gradient accumulation, ``entropy`` and ``mean_token_accuracy`` are logged from the
loss's statistics and ``evaluate()`` gives ``compute_metrics`` the argmax token and the
label's log-probability instead of logits (see that module).

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

With TRL, :class:`sftkey.integrations.trl.FusedSFTTrainer` keeps ``SFTTrainer``'s data
pipeline (chat templates, completion-only and assistant-only loss, packing, padding-free)
and takes the token weights from character spans of the data.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Optional

from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from ..integrations.trainer import FusedLossMixin

__all__ = ["FusedLossMixin", "SFTKeyTrainer", "Stage"]


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
