"""sftkey.integrations.trl.FusedSFTTrainer: TRL's pipeline intact, TRL's loss and metrics on the same batches,
token weights from character spans through templating, truncation, packing and padding-free."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from sftkey.integrations.trainer import FusedLossMixin  # noqa: E402
from sftkey.integrations.trl import FusedSFTTrainer  # noqa: E402
from sftkey.methods import keys  # noqa: E402
from sftkey.methods.data import critical_weight_spans, key_weight_spans  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
            "<|end|>{% endgeneration %}{% else %}{{ m.content }}<|end|>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _problem(a: int, b: int) -> tuple[str, str]:
    return f"Question: what is {a} + {b}?", f" We add {a} and {b}. <Answer>{a + b}</Answer>"


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained on the problems' text (decodes to its text exactly), with a chat template."""
    texts = [" ".join(_problem(a, b)) for a in range(30) for b in range(30)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>")
    tok.chat_template = TEMPLATE
    return tok


def _model(tokenizer, seed=0):
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      initializer_range=0.2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _rows(fmt: str, n: int = 12, spans: bool = False, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randint(0, 30, (2,), generator=g).tolist()
        prompt, response = _problem(a, b)
        if fmt == "prompt_completion":
            row = {"prompt": prompt, "completion": response}
        elif fmt == "conversational":
            row = {"prompt": [{"role": "user", "content": prompt}],
                   "completion": [{"role": "assistant", "content": response}]}
        else:  # conversational language modeling, for assistant_only_loss
            row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
        if spans:
            row["weight_spans"] = key_weight_spans(response)
        rows.append(row)
    return rows


def _config(tmp_path, **overrides):
    options = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], use_cpu=True,
                   bf16=False, logging_steps=1, save_strategy="no", disable_tqdm=True, max_length=48, seed=0)
    return trl.SFTConfig(str(tmp_path), **{**options, **overrides})


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    count = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [("nll", "prompt_completion", False, {}), ("dft", "conversational", False, {}),
         ("nll", "assistant_only", True, {}), ("dft", "prompt_completion", True, {}),
         ("nll", "conversational", False, {"label_smoothing_factor": 0.1}),
         ("nll", "prompt_completion", False, {"padding_free": True, "max_length": None})]


@pytest.mark.parametrize("loss_type, fmt, packing, extra", CASES,
                         ids=["nll", "dft-chat", "nll-assistant-packed", "dft-packed", "nll-smoothing", "padding-free"])
def test_loss_gradients_and_metrics_equal_trl_on_the_same_batches(tokenizer, tmp_path, loss_type, fmt, packing,
                                                                  extra):
    """TRL's own SFTTrainer (its chunked head) and FusedSFTTrainer, same data and model: the same
    batches, the loss to 1e-6, every gradient, and the logged entropy and token accuracy."""
    rows = _rows(fmt)
    options = dict(loss_type=loss_type, packing=packing, **extra)
    if fmt == "assistant_only":
        options["assistant_only_loss"] = True
    theirs = trl.SFTTrainer(model=_model(tokenizer), args=_config(tmp_path, **options),
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    ours = FusedSFTTrainer(model=_model(tokenizer), args=_config(tmp_path, **options),
                           train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    assert ours.train_dataset[:] == theirs.train_dataset[:]
    assert type(ours.data_collator) is type(theirs.data_collator)
    for mine, their in zip(ours.get_train_dataloader(), theirs.get_train_dataloader()):
        assert all(torch.equal(mine[k], their[k]) if torch.is_tensor(their[k]) else mine[k] == their[k] for k in their)
        got, want = _loss_and_grads(ours, mine), _loss_and_grads(theirs, their)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
        assert got[1].keys() == want[1].keys()
        for name in got[1]:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6, msg=name)
    for metric in ("entropy", "mean_token_accuracy"):
        assert ours._metrics["train"][metric] == pytest.approx(theirs._metrics["train"][metric], rel=1e-5)
    assert ours._metrics["train"]["num_tokens"] == theirs._metrics["train"]["num_tokens"]


def test_train_logs_the_keys_trl_logs(tokenizer, tmp_path):
    rows = _rows("prompt_completion")
    logs = []
    for cls in (trl.SFTTrainer, FusedSFTTrainer):
        trainer = cls(model=_model(tokenizer), args=_config(tmp_path), train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tokenizer)
        trainer.train()
        logs.append([h for h in trainer.state.log_history if "loss" in h])
    assert [sorted(h) for h in logs[0]] == [sorted(h) for h in logs[1]]
    assert [h["loss"] for h in logs[1]] == pytest.approx([h["loss"] for h in logs[0]], rel=1e-4)


def test_a_hand_composed_mixin_refuses_trl_loss_type(tokenizer, tmp_path):
    """FusedLossMixin in front of SFTTrainer by hand would train loss_type='dft' on the plain NLL."""
    class Composed(FusedLossMixin, trl.SFTTrainer):
        pass

    with pytest.raises(TypeError, match="FusedSFTTrainer"):
        Composed(model=_model(tokenizer), args=_config(tmp_path, loss_type="dft"),
                 train_dataset=datasets.Dataset.from_list(_rows("prompt_completion")), processing_class=tokenizer)


@pytest.mark.parametrize("options, kwargs, match", [
    (dict(loss_type="dft", label_smoothing_factor=0.1), {}, "label_smoothing_factor with loss_type='dft'"),
    ({}, dict(compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss), "compute_loss_func"),
    ({}, dict(loss_options={"dft": True}), "loss_options"),
    (dict(loss_type="sigmoid"), {}, "loss_type"),
])
def test_settings_whose_loss_differs_from_trl_are_refused_at_construction(tokenizer, tmp_path, options, kwargs, match):
    with pytest.warns() if "compute_loss_func" in kwargs else _no_context():
        with pytest.raises(ValueError, match=match):
            FusedSFTTrainer(model=_model(tokenizer), args=_config(tmp_path, **options),
                            train_dataset=datasets.Dataset.from_list(_rows("prompt_completion")),
                            processing_class=tokenizer, **kwargs)


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _decoded(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("fmt", ["prompt_completion", "conversational"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_key_spans_become_token_weights_through_trl_pipeline(tokenizer, tmp_path, fmt, packing):
    """Key-answer spans, TRL's chat template and packing: the prepared ids and labels are TRL's own,
    the tokens of weight 1 spell the answer and its end token (stage 2 trains the end of sequence,
    as keys.build_features does), the other completion tokens weigh outside_weight, and the
    step's loss is the weighted mean of the model's own cross-entropy."""
    rows = _rows(fmt, spans=True)
    config = _config(tmp_path, packing=packing, max_length=64)
    theirs = trl.SFTTrainer(model=_model(tokenizer), args=copy.deepcopy(config), processing_class=tokenizer,
                            train_dataset=datasets.Dataset.from_list([{k: v for k, v in r.items()
                                                                      if k != "weight_spans"} for r in rows]))
    model = _model(tokenizer)
    twin = copy.deepcopy(model)
    ours = FusedSFTTrainer(model=model, args=config, processing_class=tokenizer, outside_weight=0.25,
                           train_dataset=datasets.Dataset.from_list(rows))
    prepared = ours.train_dataset
    assert prepared["input_ids"] == theirs.train_dataset["input_ids"]
    assert prepared["labels"] == theirs.train_dataset["labels"]
    found = []
    for ids, labels, weights, lengths in zip(prepared["input_ids"], prepared["labels"], prepared["token_weights"],
                                             prepared["seq_lengths"] if packing else [None] * len(prepared)):
        assert all((w == 0) == (y == -100) for w, y in zip(weights, labels))
        assert set(weights) <= {0.0, 0.25, 1.0}
        for start, end in _segments(lengths, len(ids)):
            found.append(_decoded(tokenizer, [t for t, w in zip(ids[start:end], weights[start:end]) if w == 1.0]))
    # the key and the token right after the response (TRL's EOS, or the chat template's end of turn)
    ends = (tokenizer.eos_token, "<|end|>")
    assert all(f.endswith(ends) for f in found), found
    keys_found = [next(f[: -len(e)] for e in ends if f.endswith(e)) for f in found]
    assert sorted(keys_found) == sorted(str(int(a) + int(b)) for a, b in (_operands(r, fmt) for r in rows))

    batch = next(iter(ours.get_train_dataloader()))
    loss = ours.compute_loss(model, dict(batch), num_items_in_batch=ours._get_num_items_in_batch([batch], "cpu"))
    position = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    with torch.no_grad():  # the unpatched model, on the flattened row itself where packed
        logits = twin(**position, use_cache=False).logits.double()
    y, a = batch["labels"][:, 1:], batch["token_weights"][:, 1:].double()
    ce = -torch.log_softmax(logits[:, :-1], -1).gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    valid = y != -100
    torch.testing.assert_close(loss.double(), (ce * a)[valid].sum() / a[valid].sum(), rtol=1e-5, atol=1e-7)


def _operands(row, fmt):
    text = row["completion"] if fmt == "prompt_completion" else row["completion"][0]["content"]
    words = text.split()
    return words[2], words[4].rstrip(".")


def _segments(lengths, total):
    if lengths is None:
        return [(0, total)]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def test_sftkey_stage_two_through_trl_equals_the_key_features(tokenizer, tmp_path):
    """SFTKey's stage 2 from key spans (outside_weight=0) gives the ids, labels and weights of
    sftkey.methods.keys.build_features(stage=2) on the same prompt and response."""
    rows = _rows("prompt_completion", spans=True)
    trainer = FusedSFTTrainer(model=_model(tokenizer), args=_config(tmp_path, max_length=None),
                              processing_class=tokenizer, outside_weight=0.0,
                              train_dataset=datasets.Dataset.from_list(rows))
    features, report = keys.build_features(tokenizer, [{"prompt": r["prompt"], "response": r["completion"]}
                                                       for r in rows], stage=2)
    assert report.with_key == len(rows)
    prepared = trainer.train_dataset
    assert prepared["input_ids"] == [f["input_ids"] for f in features]
    assert prepared["labels"] == [f["labels"] for f in features]
    assert prepared["token_weights"] == [f["token_weights"] for f in features]


def test_cft_critical_tokens_through_trl_weigh_exactly_those_tokens(tokenizer, tmp_path):
    """CFT's critical positions of a response, as spans of its decoded text, weigh 1 on exactly
    those tokens after TRL's tokenization, 0 elsewhere."""
    rows, want = [], []
    for i, (a, b) in enumerate([(3, 4), (12, 25), (7, 7)]):
        prompt, response = _problem(a, b)
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
        critical = [1, len(response_ids) - 3, len(response_ids) - 1][: i + 1]
        text, spans = critical_weight_spans(tokenizer, response_ids, critical)
        rows.append({"prompt": prompt, "completion": text, "weight_spans": spans})
        want.append([0.0] * len(prompt_ids) + [float(t in critical) for t in range(len(response_ids))])
    trainer = FusedSFTTrainer(model=_model(tokenizer), args=_config(tmp_path, max_length=None),
                              processing_class=tokenizer, outside_weight=0.0,
                              train_dataset=datasets.Dataset.from_list(rows))
    assert trainer.train_dataset["token_weights"] == want


def test_pretokenized_token_weights_follow_truncation_and_packing(tokenizer, tmp_path):
    """Tokenized data with a token_weights column: TRL truncates and packs it with its tokens."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (9, 30, 14, 22, 5):
        ids = torch.randint(6, len(tokenizer), (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "token_weights": [float(t % 7) / 7 + 0.1 for t in ids]})
    for packing in (False, True):
        trainer = FusedSFTTrainer(model=_model(tokenizer), args=_config(tmp_path, max_length=16, packing=packing),
                                  processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows))
        for ids, weights in zip(trainer.train_dataset["input_ids"], trainer.train_dataset["token_weights"]):
            assert len(ids) <= 16 and weights == pytest.approx([float(t % 7) / 7 + 0.1 for t in ids])


def test_weighted_batches_without_a_weight_carrying_collator_are_refused(tokenizer, tmp_path):
    rows = _rows("prompt_completion", spans=True)
    trainer = FusedSFTTrainer(model=_model(tokenizer), args=_config(tmp_path), processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_list(rows),
                              data_collator=trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=0))
    with pytest.raises(ValueError, match="token_weights: the dataset's features have it"):
        trainer.train()


def test_spans_that_do_not_fit_the_response_are_refused(tokenizer, tmp_path):
    rows = _rows("prompt_completion", n=2)
    rows[0]["weight_spans"], rows[1]["weight_spans"] = [[0, 3, 1.0]], [[5, 500, 1.0]]
    with pytest.raises(ValueError, match=r"span \[5.*not a character range"):
        FusedSFTTrainer(model=_model(tokenizer), args=_config(tmp_path), processing_class=tokenizer,
                        train_dataset=datasets.Dataset.from_list(rows))


def test_evaluate_with_compute_metrics_on_prepared_eval_data(tokenizer, tmp_path):
    """evaluate() prepares the eval data with TRL's pipeline and the spans, and hands compute_metrics
    the argmax token and the label's log-probability (no logits); its loss is the weighted mean."""
    seen = []

    def compute_metrics(prediction):
        predicted, logprob = prediction.predictions
        seen.append((predicted.shape, logprob.shape, prediction.label_ids.shape))
        return {"logprob_sum": float(logprob.sum())}

    rows = _rows("conversational", n=6, spans=True)
    model = _model(tokenizer)
    trainer = FusedSFTTrainer(model=model, args=_config(tmp_path, per_device_eval_batch_size=6),
                              processing_class=tokenizer, outside_weight=0.5, compute_metrics=compute_metrics,
                              train_dataset=datasets.Dataset.from_list(rows),
                              eval_dataset=datasets.Dataset.from_list(rows))
    metrics = trainer.evaluate()
    (shapes,) = seen
    assert shapes[0] == shapes[1] == shapes[2]
    batch = next(iter(trainer.get_eval_dataloader()))
    model.eval()
    with torch.no_grad():
        want = model(**{k: v for k, v in batch.items()}).loss.item()
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-6)
    assert {"eval_entropy", "eval_mean_token_accuracy", "eval_logprob_sum"} <= set(metrics)
