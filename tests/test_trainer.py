"""SFTKeyTrainer: fused loss under Trainer, TRL-style metrics, stage 1 then stage 2 on a tiny Llama."""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from sftkey.methods import keys  # noqa: E402
from sftkey.methods.data import TokenWeightCollator  # noqa: E402
from sftkey.integrations.transformers import is_patched, use_fused_loss  # noqa: E402
from sftkey.methods.trainer import SFTKeyTrainer, Stage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sftkey_arithmetic as arithmetic  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    problems = arithmetic.make_problems(200, seed=1)
    tokenizer = arithmetic.build_tokenizer([p["prompt"] + p["response"] for p in problems])
    examples = [{"prompt": p["prompt"], "response": p["response"]} for p in problems]
    stage1, _ = keys.build_features(tokenizer, examples, stage=1)
    stage2, _ = keys.build_features(tokenizer, examples, stage=2)
    collator = TokenWeightCollator.from_tokenizer(tokenizer, padding_side="right")
    return tokenizer, stage1, stage2, collator


def _args(tmp_path, **overrides):
    options = dict(per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="constant",
                   logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(str(tmp_path), **{**options, **overrides})


def test_stage1_then_stage2_lowers_the_key_token_loss(setup, tmp_path):
    tokenizer, stage1, stage2, collator = setup
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    trainer = SFTKeyTrainer(model=model, args=_args(tmp_path), data_collator=collator)
    assert is_patched(model)
    key_batch = collator(stage2[:64])
    losses = [arithmetic.key_loss(model, stage2[:64], collator)]
    logs = []
    for stage in (Stage(stage1, max_steps=30, name="s1"), Stage(stage2, max_steps=20, learning_rate=1e-3, name="s2")):
        (output,) = trainer.train_stages(stage)
        assert output.global_step == stage.max_steps
        logs.append([h for h in trainer.state.log_history if "loss" in h])
        losses.append(arithmetic.key_loss(model, stage2[:64], collator))
        with torch.no_grad():
            out = model(**key_batch)
        assert out.logits is None
    assert losses[2] < losses[1] < losses[0], losses
    for stage_logs in logs:
        assert all(0 <= h["mean_token_accuracy"] <= 1 and h["entropy"] > 0 for h in stage_logs)
    assert logs[1][0]["learning_rate"] == pytest.approx(1e-3)
    assert trainer.args.output_dir == str(tmp_path) and trainer.args.max_steps == -1


def test_two_stages_in_one_call_and_fresh_optimizer_state(setup, tmp_path):
    tokenizer, stage1, stage2, collator = setup
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    trainer = SFTKeyTrainer(model=model, args=_args(tmp_path, logging_steps=100), data_collator=collator)
    outputs = trainer.train_stages(Stage(stage1, max_steps=4), Stage(stage2, max_steps=3, learning_rate=1e-4))
    assert [o.global_step for o in outputs] == [4, 3]
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {3}  # Adam's step counts restarted for stage 2
    assert all(g["lr"] == pytest.approx(1e-4) for g in trainer.optimizer.param_groups)


def test_loss_equals_the_plain_trainer_with_gradient_accumulation(setup, tmp_path):
    tokenizer, stage1, _, collator = setup
    features = [{k: v for k, v in f.items() if k != "token_weights"} for f in stage1[:32]]
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    twin = copy.deepcopy(model)
    args = _args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=2,
                 logging_steps=1, label_smoothing_factor=0.1)
    ours = SFTKeyTrainer(model=model, args=args, train_dataset=features, data_collator=collator)
    assert ours.label_smoother is None
    ours_out = ours.train()
    plain = transformers.Trainer(model=twin, args=args, train_dataset=features, data_collator=collator)
    plain_out = plain.train()
    assert ours_out.training_loss == pytest.approx(plain_out.training_loss, rel=1e-4)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)


def _trl_config(tmp_path, **overrides):
    """TRL's low-level route: pre-tokenized features, TRL's preparation skipped."""
    trl = pytest.importorskip("trl")
    options = dict(dataset_kwargs={"skip_prepare_dataset": True}, max_steps=2, logging_steps=1,
                   per_device_train_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True, bf16=False,
                   save_strategy="no")
    return trl.SFTConfig(str(tmp_path), **{**options, **overrides})


def test_trl_low_level_route_trains_on_token_weights(setup, tmp_path):
    """FusedSFTTrainer on pre-tokenized features with TRL's preparation skipped: the loss is the
    weighted mean of the model's own cross-entropy, and training logs TRL's metrics."""
    datasets = pytest.importorskip("datasets")
    from sftkey.integrations.trl import FusedSFTTrainer

    tokenizer, _, stage2, collator = setup
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    config = _trl_config(tmp_path, max_steps=4, logging_steps=2)
    trainer = FusedSFTTrainer(model=model, args=config, processing_class=tokenizer, data_collator=collator,
                              train_dataset=datasets.Dataset.from_list(stage2[:32]))
    batch = collator(stage2[:8])
    batch["token_weights"] = batch["token_weights"] * torch.rand(batch["token_weights"].shape)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    y, a = batch["labels"][:, 1:], batch["token_weights"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), y, reduction="none")
    torch.testing.assert_close(loss, (ce * a).sum() / a[y != -100].sum())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all({"entropy", "mean_token_accuracy", "num_tokens"} <= set(h) for h in logs)


class _Grads(transformers.TrainerCallback):
    """Keeps the gradients the optimizer is about to apply, by parameter name."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def _weighted_features(tokenizer):
    problems = arithmetic.make_problems(12, seed=7)
    examples = [{"prompt": p["prompt"], "response": p["response"]} for p in problems]
    return keys.build_features(tokenizer, examples, stage=2, cot_weight=0.1)[0]


@pytest.mark.parametrize("kind", ["SFTKeyTrainer", "FusedSFTTrainer"])
def test_weighted_mean_under_gradient_accumulation_equals_one_big_batch(setup, tmp_path, kind):
    """3 micro-batches of 4 weighted sequences: the step's loss and every gradient are those
    of the 12 sequences' weighted mean, and evaluate() on them reports the same loss: one
    weighted mean under sftkey's trainer, TRL's (its pipeline carrying the token_weights
    column) and model(**batch)."""
    tokenizer, _, _, collator = setup
    features = _weighted_features(tokenizer)
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    twin = copy.deepcopy(model)
    grads = _Grads()
    options = dict(per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=1, learning_rate=0.0,
                   optim="sgd", max_grad_norm=0.0, per_device_eval_batch_size=12)
    if kind == "SFTKeyTrainer":
        trainer = SFTKeyTrainer(model=model, args=_args(tmp_path, **options), train_dataset=features,
                                eval_dataset=features, data_collator=collator, callbacks=[grads])
    else:
        datasets = pytest.importorskip("datasets")
        trl = pytest.importorskip("trl")
        from sftkey.integrations.trl import FusedSFTTrainer

        config = trl.SFTConfig(str(tmp_path), **options, report_to=[], use_cpu=True, disable_tqdm=True, bf16=False,
                               save_strategy="no")
        data = datasets.Dataset.from_list([{k: f[k] for k in ("input_ids", "labels", "token_weights")}
                                           for f in features])
        trainer = FusedSFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=data,
                                  eval_dataset=data, callbacks=[grads])
    out = trainer.train()

    batch = collator(features)  # right padding: the padded positions change nothing
    assert batch["token_weights"][batch["labels"] != -100].sum() < (batch["labels"] != -100).sum() / 2
    use_fused_loss(twin)
    want = twin(**batch).loss
    want.backward()
    assert out.training_loss == pytest.approx(want.item(), rel=1e-5)
    (got,) = grads.steps
    for name, p in twin.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want.item(), rel=1e-5)


def test_evaluate_with_compute_metrics_gets_predicted_tokens_and_log_probs(setup, tmp_path):
    """Token accuracy and perplexity in evaluate() from the predictions the mixin returns,
    equal to the same metrics on the model's logits."""
    tokenizer, stage1, _, collator = setup
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    features = stage1[:20]

    def compute_metrics(prediction):
        predicted, logprob = prediction.predictions
        labels = prediction.label_ids
        mask = labels[:, 1:] != -100
        return {"token_accuracy": float((predicted[:, :-1] == labels[:, 1:])[mask].mean()),
                "perplexity": float(np.exp(-logprob[:, :-1][mask].mean()))}

    args = _args(tmp_path, per_device_eval_batch_size=8)
    trainer = SFTKeyTrainer(model=model, args=args, eval_dataset=features, data_collator=collator,
                            compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    correct = nll = count = 0
    with torch.no_grad():
        for start in range(0, len(features), 8):
            batch = collator(features[start:start + 8])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            y = batch["labels"][:, 1:]
            mask = y != -100
            logp = torch.log_softmax(logits[:, :-1].double(), -1)
            correct += (logits[:, :-1].argmax(-1) == y)[mask].sum().item()
            nll -= logp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)[mask].sum().item()
            count += mask.sum().item()
    assert metrics["eval_token_accuracy"] == pytest.approx(correct / count, abs=1e-9)
    assert metrics["eval_perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)
    assert 0 <= metrics["eval_mean_token_accuracy"] <= 1


def test_trainer_honours_the_patch_ignore_index(setup, tmp_path):
    """With use_fused_loss(ignore_index=1000), labels of 1000 count as ignored in the loss's
    denominator and in the logged entropy and token accuracy (Trainer itself counts -100)."""
    tokenizer, stage1, _, collator = setup
    features = [{k: v for k, v in f.items() if k != "token_weights"} for f in stage1[:8]]

    def relabel(batch):
        batch["labels"] = torch.where(batch["labels"] == -100, 1000, batch["labels"])
        return batch

    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    use_fused_loss(model, ignore_index=1000)
    args = _args(tmp_path, max_steps=1, learning_rate=0.0, logging_steps=1, per_device_train_batch_size=8)
    trainer = SFTKeyTrainer(model=model, args=args, train_dataset=features,
                            data_collator=lambda f: relabel(collator(f)))
    out = trainer.train()
    batch = relabel(collator(features))
    with torch.no_grad():
        want = model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    y = batch["labels"][:, 1:]
    mask = y != 1000
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)[mask].mean()
    assert out.training_loss == pytest.approx(want.item(), rel=1e-5)
    (log,) = [h for h in trainer.state.log_history if "entropy" in h]
    assert log["entropy"] == pytest.approx(entropy.item(), rel=1e-5)
    assert log["mean_token_accuracy"] == pytest.approx(
        (logits[:, :-1].argmax(-1) == y)[mask].double().mean().item(), abs=1e-6)


@pytest.mark.slow
def test_trainer_torch_compile_trains_like_eager(setup, tmp_path):
    tokenizer, _, stage2, collator = setup
    features = stage2[:16]
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    twin = copy.deepcopy(model)
    args = dict(per_device_train_batch_size=8, max_steps=2, logging_steps=1)
    torch._dynamo.reset()
    compiled = SFTKeyTrainer(model=model, args=_args(tmp_path, torch_compile=True, torch_compile_backend="eager",
                                                     **args), train_dataset=features, data_collator=collator)
    compiled_out = compiled.train()
    assert compiled.model_wrapped is not model  # the compiled module ran
    eager = SFTKeyTrainer(model=twin, args=_args(tmp_path, **args), train_dataset=features, data_collator=collator)
    eager_out = eager.train()
    assert compiled_out.training_loss == pytest.approx(eager_out.training_loss, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_trl_sft_trainer_refuses_to_bypass_a_patched_model(setup, tmp_path):
    """TRL's SFTTrainer puts its own fused LM head over the patch; training then raises
    (naming FusedSFTTrainer) instead of training on TRL's plain NLL, and a call with
    fused_lm_head=True of a model whose outermost forward is the patch raises too."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer, _, stage2, collator = setup
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    use_fused_loss(model, dft=True)
    trainer = trl.SFTTrainer(model=model, args=_trl_config(tmp_path), processing_class=tokenizer,
                             data_collator=collator, train_dataset=datasets.Dataset.from_list(stage2[:16]))
    with pytest.raises(ValueError, match="FusedSFTTrainer"):
        trainer.train()
    batch = collator(stage2[:4])
    with torch.no_grad():  # calls that go through the patch still work under TRL's head
        assert model(**batch).logits is None
        assert model.generate(batch["input_ids"][:1, :5], max_new_tokens=2, do_sample=False).shape == (1, 7)

    late = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    trl.trainer.utils.add_fused_lm_head(late)
    use_fused_loss(late)
    with pytest.raises(ValueError, match="fused_lm_head=True"):
        late(**batch, fused_lm_head=True)


def test_trl_keeps_the_weight_columns_and_refuses_a_collator_that_drops_them(setup, tmp_path):
    """remove_unused_columns keeps token_weights (FusedSFTTrainer lists them as model inputs); a
    collator of the caller's that drops them makes the first step raise."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from sftkey.integrations.trl import FusedSFTTrainer

    tokenizer, _, stage2, _ = setup
    data = datasets.Dataset.from_list(stage2[:16])
    kept = FusedSFTTrainer(model=arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0),
                           args=_trl_config(tmp_path, remove_unused_columns=True), processing_class=tokenizer,
                           train_dataset=data)
    assert "token_weights" in next(iter(kept.get_train_dataloader()))
    dropping = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    trainer = FusedSFTTrainer(model=arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0),
                              args=_trl_config(tmp_path), processing_class=tokenizer, train_dataset=data,
                              data_collator=dropping)
    with pytest.raises(ValueError, match="token_weights: the dataset's features have it"):
        trainer.train()


def test_plain_trainer_refuses_weighted_batches(setup, tmp_path):
    """A plain Trainer divides by its count of labelled tokens, not by the weights' sum: the
    patched model refuses the weighted batch, naming the mixin, instead of training at another scale."""
    tokenizer, _, _, collator = setup
    features = _weighted_features(tokenizer)
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    use_fused_loss(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                                   train_dataset=features, data_collator=collator)
    with pytest.raises(ValueError, match="FusedLossMixin"):
        trainer.train()
    unweighted = [{k: v for k, v in f.items() if k != "token_weights"} for f in features]
    transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                         train_dataset=unweighted, data_collator=collator).train()  # counts are right without weights


def test_plain_trainer_evaluate_with_compute_metrics_refuses_by_name(setup, tmp_path):
    """A patched model returns no logits with labels: a plain Trainer's evaluate() with
    compute_metrics (and predict()) raises naming the mixin; without compute_metrics it evaluates."""
    tokenizer, stage1, _, collator = setup
    features = [{k: v for k, v in f.items() if k != "token_weights"} for f in stage1[:8]]
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    use_fused_loss(model)

    def compute_metrics(prediction):
        return {"token_accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = _args(tmp_path, per_device_eval_batch_size=8)
    trainer = transformers.Trainer(model=model, args=args, eval_dataset=features, data_collator=collator,
                                   compute_metrics=compute_metrics)
    with pytest.raises(ValueError, match="FusedLossMixin"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="FusedLossMixin"):
        trainer.predict(features)
    plain = transformers.Trainer(model=model, args=args, eval_dataset=features, data_collator=collator)
    with torch.no_grad():
        want = model(**collator(features)).loss.item()
    assert plain.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-6)
