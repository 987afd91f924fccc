"""SFTKeyTrainer: fused loss under Trainer, TRL-style metrics, stage 1 then stage 2 on a tiny Llama."""
import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sftkey import keys  # noqa: E402
from sftkey.data import TokenWeightCollator  # noqa: E402
from sftkey.integrations.transformers import is_patched  # noqa: E402
from sftkey.trainer import SFTKeyTrainer, Stage  # noqa: E402

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


def test_trl_sft_trainer_with_the_mixin_trains_on_token_weights(setup, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from sftkey.trainer import FusedLossMixin

    class FusedSFTTrainer(FusedLossMixin, trl.SFTTrainer):
        pass

    tokenizer, _, stage2, collator = setup
    model = arithmetic.build_model(tokenizer, hidden=32, layers=1, seed=0)
    config = trl.SFTConfig(str(tmp_path), remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                           max_steps=4, logging_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                           disable_tqdm=True, bf16=False)
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
    assert len(logs) == 2 and all("entropy" in h and "mean_token_accuracy" in h for h in logs)
