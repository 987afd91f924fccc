"""ASFT and distillation on a tiny Llama (from a config, no downloads): ``use_fused_loss(model,
reference_model=ref)`` and ``SFTKeyTrainer(reference_model=ref)`` against a hand-written
materializing ASFT, in the loss and in every gradient; ``methods.asft`` and ``methods.distill``
against the materialized formulas."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sftkey  # noqa: E402
from sftkey import methods  # noqa: E402
from sftkey.integrations.transformers import use_fused_loss  # noqa: E402
from sftkey.testing import assert_close  # noqa: E402
from sftkey.methods.trainer import SFTKeyTrainer  # noqa: E402

V = 61
COMMON = dict(vocab_size=V, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama(hidden_size=32, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=hidden_size, **COMMON)).eval()


def _references(policy):
    """A drifted copy of the policy (ASFT's frozen initial model, after some training) and a
    teacher of another width (D_ref != D)."""
    drifted = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in drifted.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return {"drifted": drifted, "wider": _llama(hidden_size=48, seed=2)}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def hand_written_asft(policy, reference, batch, kl_weight):
    """ASFT as its authors' train.py writes it, on materialized logits: per token
    ``stopgrad(p_y) * ce + kl_weight * KL(p_ref || p_theta)``, the mean over labelled tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = policy(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        ref_logits = reference(**inputs).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1)
    logq = torch.log_softmax(ref_logits, -1)
    ce = -logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return ((ce.detach().neg().exp() * ce + kl_weight * kl) * mask).sum() / mask.sum()


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got_loss, got_grads, want_loss, want_grads):
    assert_close(got_loss.detach(), want_loss.detach().float(), torch.float32, "loss")
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name].float(), torch.float32, name)


@pytest.mark.parametrize("kind", ("drifted", "wider"))
def test_asft_through_use_fused_loss_matches_the_hand_written_one(kind):
    policy = _llama()
    reference = _references(policy)[kind]
    batch = _batch()
    want_loss = hand_written_asft(policy, reference, batch, 0.1)
    want_grads = _grads(policy, want_loss)
    with use_fused_loss(policy, reference_model=reference, dft=True, anchor_weight=0.1):
        out = policy(**batch)
        assert out.logits is None
        got_grads = _grads(policy, out.loss)
    _assert_same(out.loss, got_grads, want_loss, want_grads)
    assert all(p.grad is None for p in reference.parameters())
    assert want_loss.item() > hand_written_asft(policy, policy, batch, 0.0).item() + 1e-3  # the KL term counts


def test_sftkey_trainer_takes_the_reference_model(tmp_path):
    policy = _llama()
    reference = _references(policy)["drifted"]
    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = SFTKeyTrainer(model=policy, args=args, reference_model=reference,
                            loss_options=dict(dft=True, anchor_weight=0.05))
    batch = _batch(seed=3)
    want_loss = hand_written_asft(policy, reference, batch, 0.05)
    want_grads = _grads(policy, want_loss)
    policy.train()
    loss = trainer.compute_loss(policy, dict(batch))
    _assert_same(loss, _grads(policy, loss), want_loss, want_grads)
    with pytest.raises(ValueError, match="already patched"):
        SFTKeyTrainer(model=policy, args=args, reference_model=reference)


def test_a_reference_with_post_processed_logits_is_refused():
    policy = _llama()
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(hidden_size=32, logit_scale=0.3, **COMMON))
    with pytest.raises(NotImplementedError, match="logit_scale"):
        use_fused_loss(policy, reference_model=cohere)
    with pytest.raises(ValueError, match="anchor_weight given without a reference_model"):
        use_fused_loss(policy, anchor_weight=0.1)


def _heads(seed, d=12, d_ref=20, lead=(3, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.5).requires_grad_()
    xr = torch.randn(*lead, d_ref, generator=g, dtype=torch.float64)
    wr = torch.randn(V, d_ref, generator=g, dtype=torch.float64) / d_ref ** 0.5
    y = torch.randint(0, V, lead, generator=g)
    y[:, :2] = -100
    return x, w, xr, wr, y


def test_methods_asft_is_dft_plus_the_forward_kl():
    x, w, xr, wr, y = _heads(4)
    got = methods.asft(x, w, y, xr, wr, shift=True)
    logp, logq = torch.log_softmax(x @ w.T, -1)[:, :-1], torch.log_softmax(xr @ wr.T, -1)[:, :-1]
    labels = y[:, 1:]
    mask = labels != -100
    ce = -logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    want = ((ce.detach().neg().exp() * ce + methods.ASFT_ANCHOR_WEIGHT * kl) * mask).sum() / mask.sum()
    assert_close(got, want, torch.float64, "asft")
    g_got, = torch.autograd.grad(got, x)
    g_want, = torch.autograd.grad(want, x)
    assert_close(g_got, g_want, torch.float64, "asft grad")


@pytest.mark.parametrize("kind", ("forward_kl", "reverse_kl", "jsd"))
def test_methods_distill_scales_by_t_squared(kind):
    x, w, xr, wr, y = _heads(5)
    T = 2.5
    got = methods.distill(x, w, xr, wr, y, kind=kind, temperature=T, beta=0.3)
    plain = sftkey.linear_divergence(x, w, xr, wr, y, kind=kind, temperature=T, beta=0.3, backend="reference")
    assert_close(got, plain * T ** 2, torch.float64, kind)
    if kind == "forward_kl":
        logp, logq = torch.log_softmax(x @ w.T / T, -1), torch.log_softmax(xr @ wr.T / T, -1)
        mask = y != -100
        want = T ** 2 * ((logq.exp() * (logq - logp)).sum(-1) * mask).sum() / mask.sum()
        assert_close(got, want, torch.float64, "Hinton's T^2 KL")


def test_no_silent_anchor_weight():
    """ASFT's weight is its authors' 0.1 in methods.asft, and has no default anywhere else: an
    anchor without anchor_weight is refused (it was 1.0, ten times the authors' lambda)."""
    policy = _llama()
    reference = _references(policy)["drifted"]
    batch = _batch()
    with use_fused_loss(policy, reference_model=reference, dft=True):
        with pytest.raises(ValueError, match="anchor_weight is required with an anchor"):
            policy(**batch)
    x, w, xr, wr, y = _heads(6)
    with pytest.raises(ValueError, match="anchor_weight is required"):
        sftkey.linear_cross_entropy(x, w, y, anchor=(xr, wr))
    with pytest.raises(ValueError, match="anchor_weight is required"):
        sftkey.reference.linear_cross_entropy(x, w, y, anchor=(xr, wr))
    with pytest.raises(TypeError, match="kl_weight"):
        methods.asft(x, w, y, xr, wr, kl_weight=0.1)                 # one name across the API
    assert methods.ASFT_ANCHOR_WEIGHT == 0.1
    default = methods.asft(x, w, y, xr, wr)
    named = sftkey.linear_cross_entropy(x, w, y, dft=True, anchor=(xr, wr), anchor_weight=0.1)
    assert_close(default, named, torch.float64, "asft's default is the authors' 0.1")
