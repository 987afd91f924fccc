"""Axolotl plugin: sftkey's fused loss as the training loss of ``axolotl train``.

Switched on in the YAML like Axolotl's Liger and Cut Cross-Entropy plugins::

    plugins:
      - sftkey.integrations.axolotl.SFTKeyPlugin
    sftkey_fused_loss: true        # the loss is sftkey.linear_cross_entropy (no N x V logits)
    sftkey_preset: dft             # sft (default), dft, or asft (DFT + KL to the frozen base model)
    sftkey_z_loss: 1.0e-4          # optional loss options, each refining the preset
    sftkey_entropy_weight: 0.0
    sftkey_anchor_weight: 0.1      # asft's KL weight (default sftkey.methods.ASFT_ANCHOR_WEIGHT)
    sftkey_token_weights: true     # batches carry the dataset's token_weights column

The trainer is Axolotl's own (``AxolotlTrainer``) with
:class:`~sftkey.integrations.trainer.FusedLossMixin` in front: the model is patched by
:func:`~sftkey.integrations.transformers.use_fused_loss`, so the loss is the model's own
cross-entropy on every batch (Axolotl's value; ``label_smoothing_factor`` included), the
weighted mean is exact under gradient accumulation, and ``entropy`` and
``mean_token_accuracy`` are logged from the loss's statistics.

Token weights come from a pre-tokenized dataset (``input_ids``, ``attention_mask``,
``labels`` and ``token_weights``, optionally ``entropy_weights``, one value per token; e.g.
:func:`sftkey.methods.keys.build_features` for SFTKey's stages, or
:meth:`sftkey.methods.critical.CriticalResult.features` for CFT), collated by
:class:`sftkey.methods.data.TokenWeightCollator` (flattened under ``batch_flattening``, which
Axolotl runs with a varlen attention such as flash-attention 2 only, so not on a CPU).

Refused at config validation (``ValueError``), each naming the setting: another fused loss
(``liger_fused_linear_cross_entropy``, ``cut_cross_entropy``, ``chunked_cross_entropy``),
settings whose trainer is not ``AxolotlTrainer`` (``rl``, ``reward_model``,
``process_reward_model``, ``trainer_cls``, Mamba), ``orpo_alpha``, token weights with
``sample_packing`` (its multipack collator drops them) and ``asft`` with an adapter (the
reference is a frozen copy of the full model).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, model_validator

from .trainer import WEIGHT_COLUMNS, FusedLossMixin
from ..methods.data import TokenWeightCollator
from ..methods.presets import ASFT_ANCHOR_WEIGHT

__all__ = ["SFTKeyPlugin", "SFTKeyArgs", "SFTKeyAxolotlTrainer", "PRESETS"]

#: ``sftkey_preset`` -> the loss options it sets (``asft`` also anchors to a frozen copy of the model).
PRESETS = {"sft": {}, "dft": {"dft": True}, "asft": {"dft": True, "anchor_weight": ASFT_ANCHOR_WEIGHT}}

#: Settings that another component reads, under which sftkey's loss would not be the one trained.
_REFUSED = {
    "liger_fused_linear_cross_entropy": "Liger's fused linear cross-entropy replaces the same forward",
    "cut_cross_entropy": "Cut Cross-Entropy replaces the same forward",
    "chunked_cross_entropy": "Axolotl's chunked cross-entropy replaces the loss",
    "rl": "the RL trainers compute their own losses",
    "reward_model": "the reward model's trainer computes its own loss",
    "process_reward_model": "the process reward model's trainer computes its own loss",
    "trainer_cls": "the plugin's trainer would replace that trainer class",
    "orpo_alpha": "ORPO's loss is computed from the logits",
}


class SFTKeyArgs(BaseModel):
    """The plugin's YAML keys (see the module docstring)."""

    sftkey_fused_loss: Optional[bool] = None
    sftkey_preset: Optional[str] = None
    sftkey_dft: Optional[bool] = None
    sftkey_z_loss: Optional[float] = None
    sftkey_entropy_weight: Optional[float] = None
    sftkey_anchor_weight: Optional[float] = None
    sftkey_token_weights: Optional[bool] = None

    @model_validator(mode="before")
    @classmethod
    def check_sftkey(cls, data):
        keys = sorted(k for k, v in data.items() if k.startswith("sftkey_") and v is not None)
        if not data.get("sftkey_fused_loss"):
            if keys:
                raise ValueError(f"{', '.join(keys)}: set sftkey_fused_loss: true, or remove them")
            return data
        for key, why in _REFUSED.items():
            if data.get(key):
                raise ValueError(f"sftkey_fused_loss with {key}: {why}; remove one of them")
        if data.get("model_config_type") == "mamba":
            raise ValueError("sftkey_fused_loss with a Mamba model: Axolotl trains it with its own trainer")
        loss_options(data)  # the preset and the options, checked
        if data.get("sftkey_token_weights") and data.get("sample_packing"):
            raise ValueError("sftkey_token_weights with sample_packing: Axolotl's multipack collator drops the "
                             "token_weights column; use batch_flattening: true (padding-free, with a varlen "
                             "attention such as flash_attention_2) instead")
        if data.get("sftkey_preset") == "asft" and data.get("adapter"):
            raise ValueError("sftkey_preset: asft with an adapter: the reference is a frozen copy of the full "
                             "model; train without the adapter")
        return data


def loss_options(cfg) -> dict[str, Any]:
    """The loss options of a config: the preset's, refined by the ``sftkey_*`` options
    (``ValueError`` for an unknown preset, or an option that contradicts it)."""
    preset = cfg.get("sftkey_preset") or "sft"
    if preset not in PRESETS:
        raise ValueError(f"sftkey_preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    options = dict(PRESETS[preset])
    given = {"dft": cfg.get("sftkey_dft"), "z_loss": cfg.get("sftkey_z_loss"),
             "entropy_weights": cfg.get("sftkey_entropy_weight"), "anchor_weight": cfg.get("sftkey_anchor_weight")}
    given = {k: v for k, v in given.items() if v is not None}
    if "dft" in given and given["dft"] != options.get("dft", False):
        raise ValueError(f"sftkey_dft: {given['dft']} contradicts sftkey_preset: {preset}")
    if "anchor_weight" in given and preset != "asft":
        raise ValueError("sftkey_anchor_weight: only sftkey_preset: asft has an anchor")
    return {**options, **given}


class SFTKeyAxolotlTrainer(FusedLossMixin, AxolotlTrainer):
    """``AxolotlTrainer`` on the fused loss; Axolotl's own ``compute_loss`` runs (its token
    counts and model-specific inputs), reaching the patched model through ``Trainer``'s.
    :meth:`SFTKeyPlugin.get_trainer_cls` makes a subclass per config that sets the class
    attributes ``sftkey_loss_options`` and ``sftkey_reference``."""

    sftkey_loss_options: dict = {}
    sftkey_reference = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, reference_model=self.sftkey_reference, loss_options=self.sftkey_loss_options,
                         **kwargs)

    def model_loss(self, model, inputs, num_items_in_batch):
        return AxolotlTrainer.compute_loss(self, model, inputs, return_outputs=True,
                                           num_items_in_batch=num_items_in_batch)


class SFTKeyPlugin(BasePlugin):
    """Axolotl plugin: ``sftkey_fused_loss: true`` trains with :class:`SFTKeyAxolotlTrainer`."""

    def __init__(self):
        super().__init__()
        self.reference = None

    def get_input_args(self) -> str:
        return "sftkey.integrations.axolotl.SFTKeyArgs"

    def post_model_build(self, cfg, model):
        """ASFT's reference: a frozen copy of the model as loaded, before any training."""
        if cfg.sftkey_fused_loss and cfg.sftkey_preset == "asft":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def get_trainer_cls(self, cfg):
        if not cfg.sftkey_fused_loss:
            return None
        return type(SFTKeyAxolotlTrainer.__name__, (SFTKeyAxolotlTrainer,),
                    {"sftkey_loss_options": loss_options(cfg), "sftkey_reference": self.reference})

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        if not (cfg.sftkey_fused_loss and cfg.sftkey_token_weights):
            return None
        return _AxolotlTokenWeightCollator, {"padding_free": bool(cfg.batch_flattening)}


class _AxolotlTokenWeightCollator:
    """Axolotl's collator slot (``cls(tokenizer, **kwargs)``) for :class:`TokenWeightCollator`:
    right padding to Axolotl's ``pad_to_multiple_of``, or flattened with ``padding_free``."""

    def __init__(self, tokenizer, padding_free: bool = False, pad_to_multiple_of: Optional[int] = None, **_axolotl):
        self.collator = TokenWeightCollator.from_tokenizer(tokenizer, padding_side="right", padding_free=padding_free,
                                                           pad_to_multiple_of=pad_to_multiple_of)
        self.keys = ("input_ids", "attention_mask", "labels", *WEIGHT_COLUMNS)

    def __call__(self, features):
        if "token_weights" not in features[0]:
            raise ValueError("sftkey_token_weights: true, but the dataset has no token_weights column; give a "
                             "pre-tokenized dataset with one, or remove sftkey_token_weights")
        extra = sorted(set(features[0]) - set(self.keys) - {"length"})  # length: for Axolotl's samplers
        if extra:
            raise ValueError(f"sftkey_token_weights: the batch's features have {extra}, which TokenWeightCollator "
                             "does not collate; give a pre-tokenized dataset of input_ids, attention_mask, labels "
                             "and token_weights")
        return self.collator([{k: f[k] for k in self.keys if k in f} for f in features])
