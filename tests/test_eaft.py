"""EAFT (arXiv 2601.02151) against each framework's implementation on the same batch, written
here from their published code on materialized float32 logits:

* LLaMA-Factory's ``use_eaft_loss`` (the authors' code): the entropy of the softmax over the
  top-20 logits, divided by 3.0, to the power ``eaft_alpha``, times the token's cross-entropy;
  the sum over labelled tokens divided by ``num_items_in_batch`` when given, else their count;
* Axolotl's ``use_eaft``: the top-``eaft_k`` softmax's entropy with ``log(p + 1e-10)``, raw, to
  the power ``eaft_alpha``; the same denominators.

Both shift the labels (position ``t`` predicts label ``t + 1``). Checked: the preset on
``logit_stats`` (``methods.eaft``), the fused recipe (``methods.eaft_loss``, backends torch and
triton), ``use_fused_loss(model, eaft=...)`` and the trainer switch, values and gradients, and
``logit_stats``' top-k at k = 20."""
import dataclasses

import pytest
import torch

import sftkey
from sftkey import methods

from conftest import assert_close, backends

B, T, D, V = 3, 9, 16, 53


def _framework_loss(logits, labels, preset, alpha, num_items_in_batch=None):
    """The frameworks' EAFT on full logits ``[B, T, V]`` and unshifted ``labels [B, T]``."""
    k, scale, eps = {"llamafactory": (20, 3.0, 0.0), "axolotl": (20, 1.0, 1e-10)}[preset]
    k = min(k, logits.shape[-1])
    z = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    ce = torch.nn.functional.cross_entropy(z[keep], y[keep], reduction="none")
    with torch.no_grad():
        top = z[keep].detach().topk(k, dim=-1).values
        if eps:
            p = top.softmax(-1)
            entropy = -(p * torch.log(p + eps)).sum(-1)
        else:
            logp = top - top.logsumexp(-1, keepdim=True)
            entropy = -(logp.exp() * logp).sum(-1)
        weight = (entropy / scale).pow(alpha)
    total = (ce * weight).sum()
    return total / (num_items_in_batch if num_items_in_batch is not None else keep.sum())


def _batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, D, generator=g) * 1.5).to(dtype).requires_grad_()
    w = torch.randn(V, D, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    y[2, 5:] = -100
    return h, w, y


SETTINGS = [("llamafactory", 1.0), ("axolotl", 1.0), ("llamafactory", 0.5), ("axolotl", 2.0)]


def _settings(preset, alpha):
    return dataclasses.replace(methods.EAFT_SETTINGS[preset], alpha=alpha)


def _grads(loss, h, w):
    return torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("preset, alpha", SETTINGS)
@pytest.mark.parametrize("route", ["preset"] + [f"fused-{b}" for b in backends() if b != "triton-fused"])
def test_matches_the_frameworks(route, preset, alpha):
    h, w, y = _batch(1)
    want = _framework_loss(h @ w.T, y, preset, alpha)
    if route == "preset":
        st = sftkey.logit_stats(h[:, :-1], w, y[:, 1:], topk=20)
        got = methods.reduce(methods.eaft(st, _settings(preset, alpha)), st)
    else:
        got = methods.eaft_loss(h, w, y, settings=_settings(preset, alpha), shift=True, backend=route[6:])
    assert_close(got, want, torch.float32, f"{route} {preset}")
    for g, r in zip(_grads(got, h, w), _grads(want, h, w)):
        assert_close(g, r, torch.float32, f"{route} {preset} grad")


def test_denominator_is_num_items_in_batch_when_given():
    h, w, y = _batch(2)
    want = _framework_loss(h @ w.T, y, "llamafactory", 1.0, num_items_in_batch=40)
    got = methods.eaft_loss(h, w, y, shift=True, normalizer=40)
    assert_close(got, want, torch.float32, "normalizer")
    st = sftkey.logit_stats(h[:, :-1], w, y[:, 1:], topk=20)
    assert_close(methods.reduce(methods.eaft(st), st, normalizer=40), want, torch.float32, "preset normalizer")


def test_caller_token_weights_and_the_weights_alone():
    h, w, y = _batch(3)
    a = torch.rand(B, T, generator=torch.Generator().manual_seed(0))
    st = sftkey.logit_stats(h[:, :-1], w, y[:, 1:], topk=20)
    ew = methods.eaft_weights(st)
    assert ew.shape == y[:, 1:].shape and not ew.requires_grad and bool((ew[y[:, 1:] == -100] == 0).all())
    want = methods.reduce(methods.eaft(st), st, token_weights=a[:, 1:])      # a in numerator and denominator
    got = methods.eaft_loss(h, w, y, shift=True, token_weights=a)
    assert_close(got, want, torch.float32, "weighted")
    none = methods.eaft_loss(h, w, y, shift=True, reduction="none")
    assert none.shape == y.shape and torch.isfinite(none).all()


def test_vocabulary_smaller_than_k_takes_all_of_it():
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(2, 6, 8, generator=g), torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (2, 6), generator=g)
    got = methods.eaft_loss(h, w, y, settings="axolotl", shift=True)
    assert_close(got, _framework_loss(h @ w.T, y, "axolotl", 1.0), torch.float32, "V < k")


def test_use_fused_loss_and_the_trainer_switch(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sftkey.integrations.transformers import use_fused_loss
    from sftkey.methods.data import TokenWeightCollator
    from sftkey.methods.trainer import SFTKeyTrainer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for preset in ("llamafactory", "axolotl"):
        want = _framework_loss(logits, labels, preset, 1.0)
        with use_fused_loss(model, eaft=preset):
            got = model(input_ids=ids, labels=labels).loss
        assert_close(got.detach(), want, torch.float32, f"use_fused_loss eaft={preset}")
    with pytest.raises(ValueError, match="settings"):
        use_fused_loss(model, eaft="paper")

    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=B, max_steps=1, report_to=[],
                                          learning_rate=0.0, save_strategy="no", use_cpu=True)
    data = [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)]
    trainer = SFTKeyTrainer(model=model, args=args, train_dataset=data, loss_options=dict(eaft="llamafactory"),
                            data_collator=TokenWeightCollator(pad_token_id=0))
    out = trainer.train()
    assert out.training_loss == pytest.approx(_framework_loss(logits, labels, "llamafactory", 1.0).item(), rel=1e-4)


@pytest.mark.parametrize("backend", backends())
def test_logit_stats_top_20(backend):
    h, w, y = _batch(6)
    st = sftkey.logit_stats(h, w, y, topk=20, backend=backend)
    want = sftkey.logit_stats(h.double(), w.double(), y, topk=20, backend="reference")
    assert_close(st.topk, want.topk, torch.float32, f"{backend} top-20")


def test_settings_and_stats_errors_name_the_argument():
    for kwargs, match in ((dict(k=0), "k"), (dict(k=33), "k"), (dict(scale=0.0), "scale"),
                          (dict(alpha=-1.0), "alpha"), (dict(eps=float("nan")), "eps")):
        with pytest.raises(ValueError, match=match):
            methods.EaftSettings(**kwargs)
    h, w, y = _batch(7)
    with pytest.raises(ValueError, match="topk=20"):
        methods.eaft(sftkey.logit_stats(h, w, y, topk=10))
    with pytest.raises(ValueError, match="settings"):
        methods.eaft_weights(sftkey.logit_stats(h, w, y, topk=20), "paper")
    with pytest.raises(TypeError, match="eaft_loss"):
        methods.eaft_loss(h, w, y, kl_weight=0.1)
