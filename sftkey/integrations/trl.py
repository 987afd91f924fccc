"""TRL's ``SFTTrainer`` on sftkey's loss: :class:`FusedSFTTrainer`.

``FusedSFTTrainer`` is ``SFTTrainer`` with :class:`~sftkey.integrations.trainer.FusedLossMixin`
in front: TRL prepares the data as it always does (conversational and prompt-completion data,
chat templates, ``completion_only_loss``, ``assistant_only_loss``, truncation, packing,
``padding_free``) and the model computes sftkey's fused loss in place of TRL's fused LM head::

    trainer = FusedSFTTrainer(model=model, args=SFTConfig("out", loss_type="dft", packing=True),
                              train_dataset=dataset, processing_class=tokenizer)

* ``loss_type``: ``"nll"`` (and TRL's alias ``"chunked_nll"``) is the cross-entropy, ``"dft"``
  is ``dft=True``, each equal to TRL's own loss on the same batches; any other value is
  refused at construction. ``label_smoothing_factor`` becomes ``label_smoothing`` with
  ``"nll"``; with ``"dft"`` (where TRL drops it) it is refused, as are a ``compute_loss_func``
  (it needs the logits), an MoE router loss (TRL scales it by the accumulation steps; set
  ``router_aux_loss_coef=0.0``) and DeepSpeed sequence parallelism.
* Token weights from the data, through TRL's pipeline: a ``weight_spans`` column holds, per
  example, ``[start, end, weight]`` character spans of its *response*: the ``completion``
  (a string, or the content of the last message of a conversational completion), else the
  last ``assistant`` message of ``messages``, else the text (``dataset_text_field``). After
  TRL tokenizes an example (chat template included), each labelled token takes the largest
  weight of the spans its characters overlap, else ``outside_weight`` (a trainer argument,
  default 1; 0 makes the spans the only trained tokens: SFTKey's stage 2, CFT's mask). The
  characters of the tokens are those of their decoded text, checked to encode back to TRL's
  tokens (a ``ValueError`` otherwise). :func:`sftkey.methods.data.key_weight_spans` and
  :func:`~sftkey.methods.data.critical_weight_spans` make the spans. Tokenized data may carry
  ``token_weights`` / ``entropy_weights`` columns (one value per token) instead.
  Either way the weights follow TRL's truncation and packing, and a token of weight 0 gets
  label -100 (context only, as :mod:`sftkey.methods.keys` does).
* Batches: TRL's collator when nothing is weighted; with weights and no collator of the
  caller's, :class:`sftkey.methods.data.TokenWeightCollator` with TRL's settings
  (``padding_free`` included), which gives TRL's batch plus the weights.
* The logged ``entropy`` and ``mean_token_accuracy`` come from the loss's statistics, and
  ``num_tokens`` is counted as TRL counts it; ``evaluate()`` gives ``compute_metrics`` the
  argmax token and the label's log-probability (``FusedLossMixin.prediction_step``).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..methods.data import TokenWeightCollator, check_spans, span_weights
from ..methods.keys import IGNORE_INDEX
from .trainer import WEIGHT_COLUMNS, FusedLossMixin

__all__ = ["FusedSFTTrainer", "SPANS_COLUMN", "LOSS_TYPES"]

#: The dataset column of per-example ``[start, end, weight]`` character spans of the response.
SPANS_COLUMN = "weight_spans"

#: TRL ``loss_type`` -> the loss options that compute TRL's value; other values are refused.
LOSS_TYPES = {"nll": {"dft": False}, "chunked_nll": {"dft": False}, "dft": {"dft": True}}


class FusedSFTTrainer(FusedLossMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` whose loss is :func:`sftkey.linear_cross_entropy` (see the module
    docstring). ``outside_weight``: the token weight of labelled tokens outside every
    ``weight_spans`` span (float >= 0); ``reference_model`` and ``loss_options``:
    :class:`~sftkey.integrations.trainer.FusedLossMixin`'s."""

    def __init__(self, *args, outside_weight: float = 1.0, **kwargs):
        if isinstance(outside_weight, bool) or not isinstance(outside_weight, (int, float)) \
                or not math.isfinite(outside_weight) or outside_weight < 0:
            raise ValueError(f"outside_weight: expected a finite float >= 0, got {outside_weight!r}")
        self.outside_weight = float(outside_weight)
        given_collator = kwargs.get("data_collator", args[2] if len(args) > 2 else None)
        super().__init__(*args, **kwargs)
        if given_collator is None and any(_weight_columns(d) for d in self._datasets()):
            self.data_collator = _weighted_collator(self.data_collator)

    def args_loss_options(self) -> dict[str, Any]:
        """The loss options of TRL's settings (``loss_type``, ``label_smoothing_factor``), or a
        ``ValueError`` for a setting whose loss sftkey does not compute as TRL does."""
        args = self.args
        if args.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={args.loss_type!r}: FusedSFTTrainer computes TRL's {sorted(LOSS_TYPES)}; "
                             "train with TRL's own SFTTrainer for this one")
        options = dict(LOSS_TYPES[args.loss_type])
        if args.label_smoothing_factor:
            if options["dft"]:
                raise ValueError("label_smoothing_factor with loss_type='dft': TRL's DFT loss ignores the smoothing; "
                                 "set label_smoothing_factor=0, or use loss_type='nll'")
            options["label_smoothing"] = args.label_smoothing_factor
        if self.compute_loss_func is not None:
            raise ValueError("compute_loss_func: it computes the loss from logits, which the fused loss never "
                             "forms; pass the loss's options as loss_options=, or train with TRL's SFTTrainer")
        if self.aux_loss_enabled:
            raise ValueError("the MoE router loss: TRL adds it divided by the accumulation steps, the patched model as "
                             "the model's forward does (undivided); set SFTConfig(router_aux_loss_coef=0.0), or train "
                             "with sftkey.methods.trainer.SFTKeyTrainer")
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise ValueError("sequence parallelism: Trainer reduces the model's own loss across the sequence shards "
                             "there, which FusedSFTTrainer does not support")
        return options

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._total_train_tokens += self._batch_tokens(inputs)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return result

    def _batch_tokens(self, inputs: dict) -> int:
        """Tokens of the batch over the processes (padding excluded; a padding-free row whole),
        counted once per tensor-parallel group: TRL's ``num_tokens``."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:
            raise ValueError("the batch has neither attention_mask nor position_ids to count its tokens by")
        return int(self.accelerator.gather_for_metrics(local).sum().item()) // self._tp_size

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns,
                                   *(c for c in WEIGHT_COLUMNS if c not in self._signature_columns)]

    def _datasets(self) -> list:
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        return [d for d in (self.train_dataset, *evals.values()) if d is not None]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation, with the weights carried through it (see the module docstring):
        TRL tokenizes and labels the examples whole, the spans become ``token_weights``, then
        TRL truncates, packs and shuffles, with the labels standing for their tokens' places."""
        columns = set(_column_names(dataset))
        carried = [c for c in WEIGHT_COLUMNS if c in columns]
        if not carried and SPANS_COLUMN not in columns:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if isinstance(dataset, IterableDataset):
            raise ValueError(f"{dataset_name} dataset: token weights are carried through TRL's preparation for a "
                             "datasets.Dataset only; materialize the IterableDataset")
        if SPANS_COLUMN in columns:
            if carried or "input_ids" in columns:
                raise ValueError(f"{dataset_name} dataset: {SPANS_COLUMN} are character spans of raw text; tokenized "
                                 "data carries per-token token_weights instead (not both)")
            if formatting_func is not None:
                raise ValueError(f"{dataset_name} dataset: {SPANS_COLUMN} with a formatting_func: the spans cannot "
                                 "be located in the formatted text; format the dataset's text column first")
        whole = copy.copy(args)  # a shallow copy: TrainingArguments' __post_init__ must not run again
        whole.max_length, whole.shuffle_dataset = None, False
        tokenized = super()._prepare_dataset(dataset, processing_class, whole, False, formatting_func, dataset_name)
        if SPANS_COLUMN in columns:
            tokenized = tokenized.map(
                _span_token_weights, remove_columns=[SPANS_COLUMN],
                fn_kwargs={"tokenizer": self._tokenizer, "text_field": args.dataset_text_field,
                           "outside_weight": self.outside_weight, "dataset_name": dataset_name})
            carried = ["token_weights"]
        if "token_weights" in carried:
            tokenized = tokenized.map(_weighted_labels)
        return _through_trl(self, tokenized, carried, processing_class, args, packing, dataset_name)


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    return list(next(iter(dataset)).keys()) if names is None else names


def _weight_columns(dataset) -> list[str]:
    return [c for c in WEIGHT_COLUMNS if c in _column_names(dataset)]


def _response(example: dict, text_field: str, where: str) -> str:
    """The text an example's ``weight_spans`` index: its completion, last assistant message, or text."""
    if "completion" in example:
        found = example["completion"]
        if not isinstance(found, str):
            found = found[-1]["content"] if found else None
    elif "messages" in example:
        found = next((m["content"] for m in reversed(example["messages"]) if m.get("role") == "assistant"), None)
    else:
        found = example.get(text_field)
    if not isinstance(found, str):
        raise ValueError(f"{where}: no response text for {SPANS_COLUMN} (a completion, an assistant message's "
                         f"string content, or the {text_field!r} column)")
    return found


def _span_token_weights(example: dict, *, tokenizer, text_field: str,
                        outside_weight: float, dataset_name: str) -> dict:
    """``token_weights`` of one tokenized example from its ``weight_spans``."""
    where = f"{dataset_name} dataset, {SPANS_COLUMN} of an example"
    response = _response(example, text_field, where)
    spans = check_spans(example[SPANS_COLUMN], len(response), where)
    ids = list(example["input_ids"])
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise ValueError(f"{where}: the tokenizer does not encode the decoded text of TRL's tokens back to them, so "
                         "character spans cannot be mapped onto them; give tokenized data with per-token "
                         "token_weights instead")
    start, lead = text.rfind(response), 0
    if start < 0:  # a chat template that trims the content
        stripped = response.strip()
        start, lead = text.rfind(stripped), len(response) - len(response.lstrip())
        if not stripped or start < 0:
            raise ValueError(f"{where}: the response text is not in the tokenized example (does the chat template "
                             "rewrite it?)")
    located = [(start + s - lead, start + e - lead, w) for s, e, w in spans]
    return {"token_weights": span_weights(enc["offset_mapping"], located, outside_weight)}


def _weighted_labels(example: dict) -> dict:
    """Weight 0 where the label is ignored; label -100 where the weight is 0."""
    weights = [w if y != IGNORE_INDEX else 0.0 for w, y in zip(example["token_weights"], example["labels"])]
    return {"token_weights": weights, "labels": [y if w > 0 else IGNORE_INDEX for w, y in zip(weights, example["labels"])]}


def _through_trl(trainer: SFTTrainer, tokenized, carried: list[str], processing_class, args, packing: bool,
                 dataset_name: str):
    """TRL's truncation, packing and shuffling of ``tokenized`` (which TRL tokenized and
    labelled), with the ``carried`` per-token columns following their tokens: each label is
    replaced by its token's index in the flattened dataset for TRL's pass, then restored."""
    lengths = np.array([len(ids) for ids in tokenized["input_ids"]], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    labels = np.concatenate([np.asarray(y, dtype=np.int64) for y in tokenized["labels"]]) if len(lengths) else \
        np.zeros(0, dtype=np.int64)
    values = {c: np.concatenate([np.asarray(v, dtype=np.float32) for v in tokenized[c]]) if len(lengths) else
              np.zeros(0, dtype=np.float32) for c in carried}

    def to_places(example, idx):
        return {"labels": [int(starts[idx]) + t if y != IGNORE_INDEX else IGNORE_INDEX
                           for t, y in enumerate(example["labels"])]}

    def from_places(example):
        places = np.asarray(example["labels"], dtype=np.int64)
        kept = places != IGNORE_INDEX
        out = {"labels": np.where(kept, labels[np.where(kept, places, 0)], IGNORE_INDEX).tolist()}
        for c in carried:
            out[c] = np.where(kept, values[c][np.where(kept, places, 0)], 0.0).tolist()
        return out

    placed = tokenized.remove_columns(carried).map(to_places, with_indices=True)
    prepared = super(FusedSFTTrainer, trainer)._prepare_dataset(placed, processing_class, args, packing, None,
                                                                dataset_name)
    return prepared.map(from_places)


def _weighted_collator(collator):
    """TRL's default ``collator`` as a :class:`TokenWeightCollator` with its settings (the same
    batch, plus the weights). (A collator of the caller's stays: FusedLossMixin refuses
    batches that lost the weights.)"""
    if not isinstance(collator, DataCollatorForLanguageModeling):
        return collator  # TRL's vision collator: vision datasets skip the preparation that makes the weights
    if collator.return_position_ids:
        raise ValueError("token weights with TRL's return_position_ids (sequence parallelism) are not supported")
    return _SelectedKeys(TokenWeightCollator(pad_token_id=collator.pad_token_id, padding_side="right",
                                             pad_to_multiple_of=collator.pad_to_multiple_of,
                                             padding_free=collator.padding_free))


class _SelectedKeys:
    """A collator that reads the keys TRL's collator reads (ids, labels, packed lengths) and the
    weights; the dataset's other columns (text, prompt, ...) are left out, as TRL leaves them."""

    def __init__(self, collator: TokenWeightCollator):
        self.collator = collator
        self.keys = ("input_ids", "labels", *WEIGHT_COLUMNS, *(("seq_lengths",) if collator.padding_free else ()))

    def __call__(self, features):
        return self.collator([{k: f[k] for k in self.keys if k in f} for f in features])
