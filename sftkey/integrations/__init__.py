"""Integrations with other libraries, one submodule each, imported on demand so that
``import sftkey`` never imports them: :mod:`sftkey.integrations.transformers` (``use_fused_loss``
for Hugging Face causal LMs), :mod:`~sftkey.integrations.trainer` (``FusedLossMixin`` for
``transformers.Trainer``), :mod:`~sftkey.integrations.trl` (``FusedSFTTrainer``, TRL's
``SFTTrainer`` on the fused loss) and :mod:`~sftkey.integrations.axolotl` (the Axolotl plugin)."""
