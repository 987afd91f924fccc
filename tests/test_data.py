"""sftkey.methods.data: the token-weight collator."""
from types import SimpleNamespace

import pytest
import torch

from sftkey.methods.data import TokenWeightCollator

FEATURES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "token_weights": [0.0, 1.0, 0.5],
     "entropy_weights": [0.0, 0.1, 0.1]},
    {"input_ids": [8], "labels": [8], "token_weights": [2.0], "entropy_weights": [0.2]},
]


def test_right_padding_values_and_dtypes():
    batch = TokenWeightCollator(pad_token_id=0)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["token_weights"].tolist() == [[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]]
    assert torch.allclose(batch["entropy_weights"], torch.tensor([[0.0, 0.1, 0.1], [0.2, 0.0, 0.0]]))
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long
    assert batch["token_weights"].dtype == batch["entropy_weights"].dtype == torch.float32


def test_left_padding_and_multiple():
    batch = TokenWeightCollator(pad_token_id=1, padding_side="left", pad_to_multiple_of=4)(FEATURES)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 1, 1, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    assert batch["token_weights"].tolist() == [[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 2.0]]
    assert TokenWeightCollator(0, pad_to_multiple_of=3)(FEATURES)["input_ids"].shape == (2, 3)


def test_optional_keys_and_tensor_inputs():
    features = [{"input_ids": torch.tensor([3, 4]), "attention_mask": torch.tensor([1, 1])}, {"input_ids": [9]}]
    features[1]["attention_mask"] = [1]
    batch = TokenWeightCollator(0)(features)
    assert set(batch) == {"input_ids", "attention_mask"}
    batch = TokenWeightCollator(0)([{"input_ids": [3, 4]}, {"input_ids": []}])
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 0]]


def test_from_tokenizer():
    c = TokenWeightCollator.from_tokenizer(SimpleNamespace(pad_token_id=None, eos_token_id=2, padding_side="left"))
    assert (c.pad_token_id, c.padding_side) == (2, "left")
    c = TokenWeightCollator.from_tokenizer(SimpleNamespace(pad_token_id=0, eos_token_id=2, padding_side="left"),
                                           padding_side="right", pad_to_multiple_of=8)
    assert (c.pad_token_id, c.padding_side, c.pad_to_multiple_of) == (0, "right", 8)
    with pytest.raises(ValueError, match="tokenizer"):
        TokenWeightCollator.from_tokenizer(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_dataloader_and_trainer_slot(tmp_path):
    collator = TokenWeightCollator(pad_token_id=0, pad_to_multiple_of=8)
    batches = list(torch.utils.data.DataLoader(FEATURES * 3, batch_size=4, collate_fn=collator))
    assert [b["input_ids"].shape for b in batches] == [(4, 8), (2, 8)]

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, remove_unused_columns=False,
        report_to=[], use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=FEATURES * 2, data_collator=collator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["token_weights"].shape == batch["input_ids"].shape == (2, 8)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(pad_token_id=None), TypeError, "pad_token_id"),
        (dict(pad_token_id=True), TypeError, "pad_token_id"),
        (dict(pad_token_id=0, padding_side="center"), ValueError, "padding_side"),
        (dict(pad_token_id=0, pad_to_multiple_of=0), ValueError, "pad_to_multiple_of"),
        (dict(pad_token_id=0, pad_to_multiple_of=2.5), ValueError, "pad_to_multiple_of"),
    ],
)
def test_constructor_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        TokenWeightCollator(**kwargs)


@pytest.mark.parametrize(
    "features, match",
    [
        ([], "features: expected at least one"),
        ([{"labels": [1]}], "input_ids"),
        ([{"input_ids": [1], "prompt": "hi"}], r"unexpected \['prompt'\]"),
        ([{"input_ids": [1], "token_weights": [1.0]}, {"input_ids": [2]}], r"features\[1\]: keys"),
        ([{"input_ids": [1, 2], "labels": [1]}], r"features\[0\]\['labels'\]: shape \(1,\)"),
        ([{"input_ids": [[1, 2]]}], r"features\[0\]\['input_ids'\]: expected one sequence"),
    ],
)
def test_call_validation(features, match):
    with pytest.raises(ValueError, match=match):
        TokenWeightCollator(0)(features)
