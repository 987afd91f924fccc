"""What the public functions return besides the loss: per-token statistics, shaped like the targets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossStats:
    """Per-token statistics returned with ``return_stats=True``, each shaped like ``targets``
    (after ``shift``), detached: ``lse``, ``entropy``, ``target_logprob`` (0 on ignored
    tokens), ``correct`` (bool: the argmax equals the target; False on ignored tokens) and
    ``predicted`` (int64: the argmax token, on every token, ignored ones included)."""

    lse: Tensor
    entropy: Tensor
    target_logprob: Tensor
    correct: Tensor
    predicted: Tensor

    @classmethod
    def of(cls, stats, y: Tensor, shape: torch.Size) -> "LossStats":
        """The view of a backend's row statistics ``stats`` (``[N]`` each) for targets ``y``
        (``[N]``, -1 where ignored) shaped ``shape``."""
        st = LogitStats.of(stats, y, shape)
        return cls(st.lse.detach(), st.entropy.detach(), st.target_logprob.detach(),
                   (st.argmax == y.reshape(shape)) & st.valid, st.argmax)


@dataclass(frozen=True)
class LogitStats:
    """Differentiable per-token statistics of the logits, each shaped like ``targets``
    (``topk``: ``[..., k]``, no gradient). ``valid`` marks the non-ignored tokens."""

    lse: Tensor
    target_logit: Tensor
    expected_logit: Optional[Tensor]
    weighted_logit_sum: Optional[Tensor]
    argmax: Optional[Tensor]
    topk: Optional[Tensor]
    valid: Tensor

    @classmethod
    def of(cls, stats, y: Tensor, shape: torch.Size) -> "LogitStats":
        """A backend's row statistics ``stats`` for targets ``y`` (``[N]``, -1 where ignored),
        shaped ``shape``; a statistic that was not computed stays None."""
        def shaped(t, *trailing):
            return None if t is None else t.reshape(*shape, *trailing)

        return cls(shaped(stats.lse), shaped(stats.target_logit), shaped(stats.expected_logit),
                   shaped(stats.weighted_logit_sum), shaped(stats.argmax), shaped(stats.topk, -1), shaped(y >= 0))

    @property
    def target_logprob(self) -> Tensor:
        """``log p_y = z_y - lse`` (0 on ignored tokens)."""
        return torch.where(self.valid, self.target_logit - self.lse, torch.zeros_like(self.lse))

    @property
    def entropy(self) -> Tensor:
        """``H = lse - sum_j p_j z_j``."""
        return self.lse - self.expected_logit
