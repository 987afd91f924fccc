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


def _flat_features(seed=0, lengths=(5, 9, 7)):
    g = torch.Generator().manual_seed(seed)
    features = []
    for n in lengths:
        ids = torch.randint(3, 50, (n,), generator=g).tolist()
        labels = [-100] * 2 + ids[2:]
        features.append({"input_ids": ids, "labels": labels, "token_weights": torch.rand(n, generator=g).tolist(),
                         "entropy_weights": (0.1 * torch.rand(n, generator=g)).tolist()})
    return features


@pytest.mark.parametrize("multiple", [None, 8])
@pytest.mark.parametrize("packed", [False, True], ids=["sequences", "packed-rows"])
def test_padding_free_batch_is_trls_batch_plus_the_weights(multiple, packed):
    """TokenWeightCollator(padding_free=True) gives TRL's padding-free batch key for key (ids,
    labels, position_ids, the varlen arguments), plus the weights; padded, TRL's padded batch."""
    trl = pytest.importorskip("trl")
    features = _flat_features()
    if packed:  # TRL's packing: rows of several sequences with their seq_lengths
        features = [{k: features[0][k] + features[1][k] for k in features[0]} | {"seq_lengths": [5, 9]},
                    features[2] | {"seq_lengths": [7]}]
    theirs = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True,
                                                                     pad_to_multiple_of=multiple)
    want = theirs([{k: f[k] for k in ("input_ids", "labels", "seq_lengths") if k in f} for f in features])
    got = TokenWeightCollator(0, padding_free=True, pad_to_multiple_of=multiple)(features)
    assert set(got) == set(want) | {"token_weights", "entropy_weights", "use_cache"} and got["use_cache"] is False
    for key, value in want.items():
        assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key
    flat = [w for f in features for w in f["token_weights"]]
    assert got["token_weights"][0, :len(flat)].tolist() == pytest.approx(flat)
    if not packed:
        padded_theirs = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=0)(
            [{k: f[k] for k in ("input_ids", "labels")} for f in features])
        padded = TokenWeightCollator(0)(features)
        assert all(torch.equal(padded[k], v) for k, v in padded_theirs.items())


def test_padding_free_batch_equals_the_padded_batch_in_loss_and_every_gradient():
    """Token and entropy weights flattened with the sequences: a patched Llama's loss and every
    gradient equal the padded batch's (the normalizer of the step given, as the mixin gives it),
    while transformers' DataCollatorWithFlattening would have dropped the weights."""
    transformers = pytest.importorskip("transformers")
    from sftkey.integrations.transformers import use_fused_loss

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    use_fused_loss(model)
    features = _flat_features()
    results = []
    for batch in (TokenWeightCollator(0)(features), TokenWeightCollator(0, padding_free=True)(features)):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, normalizer=torch.tensor(4.0)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded_loss, padded_grads), (flat_loss, flat_grads) = results
    torch.testing.assert_close(flat_loss, padded_loss, rtol=1e-6, atol=1e-7)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    hf = transformers.DataCollatorWithFlattening(return_tensors="pt")(features)
    assert "token_weights" not in hf
    flat = TokenWeightCollator(0, padding_free=True)(features)
    assert all(torch.equal(flat[k], hf[k]) for k in ("input_ids", "labels", "position_ids"))


@pytest.mark.parametrize("features, match", [
    ([{"input_ids": [1, 2], "attention_mask": [1, 0]}], r"attention_mask'\]: has zeros"),
    ([{"input_ids": [1, 2, 3], "seq_lengths": [1, 1]}], r"seq_lengths'\]: \[1, 1\] do not split its 3 tokens"),
])
def test_padding_free_validation(features, match):
    with pytest.raises(ValueError, match=match):
        TokenWeightCollator(0, padding_free=True)(features)
    with pytest.raises(ValueError, match="padding_free"):
        TokenWeightCollator(0)([{"input_ids": [1], "seq_lengths": [1]}])


def test_weight_spans_of_tokens():
    from sftkey.methods.data import check_spans, key_weight_spans, span_weights

    assert span_weights([(0, 2), (2, 5), (5, 5), (5, 9)], [(3, 6, 1.0), (8, 9, 0.5)], 0.1) == [0.1, 1.0, 0.1, 1.0]
    assert key_weight_spans("so <Answer> 42 </Answer>", key_weight=2.0) == [[12, 14, 2.0], [24, 25, 2.0]]
    assert key_weight_spans("so <Answer> 42 </Answer>", include_eos=False) == [[12, 14, 1.0]]
    assert key_weight_spans("no key here") == []
    assert check_spans([[0.0, 3.0, 1]], 3, "x") == [(0, 3, 1.0)]
    assert check_spans([[3, 4, 1]], 3, "x") == [(3, 4, 1.0)]  # the token after the text
    for bad in ([[2, 1, 1.0]], [[0, 5, 1.0]], [[0, 1, -1.0]], [[0.5, 1, 1.0]], [[0, 1]], "0:1"):
        with pytest.raises(ValueError, match="x: "):
            check_spans(bad, 3, "x")
