"""SED-SFT's calibrated threshold against the same quantile of materialized float64 logits;
the top-k gate of methods.sed_sft; the authors' settings run end to end."""
import pytest
import torch

import sftkey
from sftkey import methods
from sftkey.methods.sed import top_mass

from conftest import TOLERANCE, backends

V, D = 37, 12


def _heads(n_batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    out = []
    for i in range(n_batches):
        h = torch.randn(2, 5 + i, D, generator=g, dtype=torch.float64) * (1 + i)
        y = torch.randint(0, V, (2, 5 + i), generator=g)
        y[0, :2] = -100
        out.append((h, y))
    return w, out


def _materialized_mass(h, w, y, k):
    p = torch.softmax(h @ w.T, -1)
    return p.topk(k, -1).values.sum(-1)[y != -100]


FAST = [(b, dt) for b in backends() for dt in (torch.float32, torch.bfloat16)] + [("torch", torch.float64)]


@pytest.mark.parametrize("backend, dtype", FAST, ids=str)
@pytest.mark.parametrize("k", [1, 2, 10, 20])
@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.7, 1.0])
def test_threshold_from_stats_matches_materialized_quantile(backend, dtype, k, quantile):
    w, batches = _heads()
    w = w.to(dtype)
    stats = [sftkey.logit_stats(h.to(dtype), w, y, topk=k, backend=backend) for h, y in batches]
    got = methods.calibrate_sed_threshold(stats, quantile=quantile, k=k)
    masses = torch.cat([_materialized_mass(h.to(dtype).double(), w.double(), y, k) for h, y in batches])
    want = torch.quantile(masses, quantile).item()
    assert abs(got - want) <= TOLERANCE[dtype] * want
    assert 0 < got <= 1


def test_threshold_gates_about_a_quantile_share():
    w, batches = _heads(n_batches=6)
    stats = [sftkey.logit_stats(h, w, y, topk=2) for h, y in batches]
    masses = torch.cat([top_mass(st, 2)[st.valid] for st in stats])
    for q in (0.1, 0.3, 0.7):
        tau = methods.calibrate_sed_threshold(stats, quantile=q, k=2)
        assert abs((masses < tau).double().mean().item() - q) <= 1.0 / len(masses) + 1e-12


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0)
    return transformers.LlamaForCausalLM(config).double().eval()


def _val_data(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        ids = torch.randint(1, V, (4 + 3 * i % 11,), generator=g)
        labels = ids.clone()
        labels[: len(ids) // 2] = -100                       # the prompt
        data.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return data


@pytest.mark.parametrize("tokens", ["labels", "all"])
@pytest.mark.parametrize("k", [2, 10])
def test_threshold_from_model_matches_materialized_quantile(tiny_llama, tokens, k):
    data = _val_data()
    masses = []
    for item in data[:5]:                                    # num_samples=5: the first five
        ids = torch.tensor([item["input_ids"]])
        with torch.no_grad():
            logits = tiny_llama(input_ids=ids).logits[0, :-1].double()
        target = ids[0, 1:] if tokens == "all" else torch.tensor(item["labels"][1:])
        keep = target != -100
        masses.append(torch.softmax(logits, -1).topk(k, -1).values.sum(-1)[keep])
    want = torch.quantile(torch.cat(masses), 0.3).item()
    for batch_size in (1, 3, 8):                             # right padding must not change it
        got = methods.calibrate_sed_threshold(tiny_llama, quantile=0.3, k=k, data=data, num_samples=5,
                                              tokens=tokens, batch_size=batch_size, backend="torch")
        assert got == pytest.approx(want, rel=1e-9)


def test_model_data_as_tensors_with_attention_mask(tiny_llama):
    data = _val_data()
    as_tensors = [{"input_ids": torch.tensor(d["input_ids"] + [0, 0]),
                   "attention_mask": torch.tensor([1] * len(d["input_ids"]) + [0, 0]),
                   "labels": torch.tensor(d["labels"] + [-100, -100])} for d in data]
    for tokens in ("labels", "all"):
        a = methods.calibrate_sed_threshold(tiny_llama, 0.5, 2, data=data, tokens=tokens, backend="torch")
        b = methods.calibrate_sed_threshold(tiny_llama, 0.5, 2, data=as_tensors, tokens=tokens, backend="torch")
        assert a == pytest.approx(b, rel=1e-9)


@pytest.mark.parametrize("name", sorted(methods.SED_SFT_SETTINGS))
def test_settings_run_end_to_end(tiny_llama, name):
    s = methods.SED_SFT_SETTINGS[name]
    data = _val_data()
    if s.threshold is None:
        tau = methods.calibrate_sed_threshold(tiny_llama, s.quantile, s.calibration_k, data=data,
                                              num_samples=s.num_samples, tokens=s.tokens, backend="torch")
    else:
        tau = s.threshold
    ids = torch.tensor([data[-1]["input_ids"]])
    labels = torch.tensor([data[-1]["labels"]])
    hidden = tiny_llama.model(input_ids=ids).last_hidden_state
    st = sftkey.logit_stats(hidden[:, :-1], tiny_llama.lm_head.weight, labels[:, 1:], topk=s.k)
    loss = methods.reduce(methods.sed_sft(st, lam=s.lam, threshold=tau, k=s.k), st)
    loss.backward()
    assert torch.isfinite(loss) and 0 < tau <= 1
    assert tiny_llama.lm_head.weight.grad is not None
    tiny_llama.zero_grad()


def _authors_sed_loss(logits, labels, lam, k, tau):
    """SEDLoss as the authors' sft_trainer_v2 runs it, on materialized logits: ``ce +
    lam * [top-k probability sum < tau] * (p_y (p_y - 1) + 1/4)``, the mean over labelled tokens."""
    z, y = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = y != -100
    z, y = z[keep], y[keep]
    probs = torch.softmax(z, -1)
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    p = probs[torch.arange(len(y)), y]
    gate = probs.topk(k, -1).values.sum(-1) < tau
    return (ce + (p * (p - 1) + 0.25) * gate * lam).sum() / keep.sum()


def _authors_threshold(model, data, top_k, cumsum_ratio, num_samples=100):
    """train.py's compute_cumsum_threshold: the top-k mass at every position of the first
    samples, ``sorted(masses)[-int(cumsum_ratio * n)]``."""
    masses = []
    for item in data[:num_samples]:
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([item["input_ids"]])).logits, -1)
        masses += probs.topk(top_k, -1).values.sum(-1)[0].tolist()
    return sorted(masses)[-int(cumsum_ratio * len(masses))]


def test_sed_triton_run_is_the_authors_loss(tiny_llama):
    s = methods.SED_SFT_SETTINGS["sed_triton"]
    assert s.threshold is not None
    data = _val_data()
    n = min(len(data[-1]["input_ids"]), len(data[-2]["input_ids"]))
    ids = torch.tensor([data[-1]["input_ids"][:n], data[-2]["input_ids"][:n]])
    labels = torch.tensor([data[-1]["labels"][:n], data[-2]["labels"][:n]])
    hidden = tiny_llama.model(input_ids=ids).last_hidden_state.detach()
    want = _authors_sed_loss(hidden @ tiny_llama.lm_head.weight.detach().T, labels, 1.0, 10, 0.95)
    st = sftkey.logit_stats(hidden[:, :-1], tiny_llama.lm_head.weight.detach(), labels[:, 1:], topk=s.k)
    got = methods.reduce(methods.sed_sft(st, lam=s.lam, threshold=s.threshold, k=s.k), st)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    assert got.item() == pytest.approx(methods.reduce(methods.sed_sft(st), st).item(), rel=1e-12)  # the defaults


@pytest.mark.parametrize("name, cumsum_ratio", [("trainer", 0.3), ("paper_script", 0.7)])
def test_calibrated_runs_are_the_authors_threshold(tiny_llama, name, cumsum_ratio):
    """Their order statistic over every position; ours interpolates over every position but
    the last: the two lie within the spread of neighbouring masses."""
    s = methods.SED_SFT_SETTINGS[name]
    data = _val_data(n=40)
    want = _authors_threshold(tiny_llama, data, s.calibration_k, cumsum_ratio)
    got = methods.calibrate_sed_threshold(tiny_llama, s.quantile, s.calibration_k, data=data,
                                          num_samples=s.num_samples, tokens=s.tokens, backend="torch")
    assert s.k == 2 and s.lam == 1.0 and s.tokens == "all"
    assert got == pytest.approx(want, rel=2e-3)


def test_calibration_states_its_choices_and_takes_k_20(tiny_llama):
    w, batches = _heads(1)
    (h, y), = batches
    st = sftkey.logit_stats(h, w, y, topk=2)
    with pytest.raises(TypeError):
        methods.calibrate_sed_threshold([st])                              # no default quantile, k
    with pytest.raises(ValueError, match="tokens"):
        methods.calibrate_sed_threshold(tiny_llama, 0.3, 2, data=_val_data())  # nor tokens with a model
    tau = methods.calibrate_sed_threshold(tiny_llama, 0.3, 20, data=_val_data(), tokens="all", backend="torch")
    assert 0 < tau <= 1
    with pytest.raises(ValueError, match=r"^k: expected an int in \[1, 32\]"):
        methods.calibrate_sed_threshold(tiny_llama, 0.3, 40, data=_val_data(), tokens="all")


def test_calibration_on_a_peft_model(tiny_llama):
    peft = pytest.importorskip("peft")
    import copy
    data = _val_data()
    plain = methods.calibrate_sed_threshold(tiny_llama, 0.3, 2, data=data, tokens="labels", backend="torch")
    same = peft.get_peft_model(copy.deepcopy(tiny_llama), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert methods.calibrate_sed_threshold(same, 0.3, 2, data=data, tokens="labels", backend="torch") == \
        pytest.approx(plain, rel=1e-12)                                    # LoRA starts as the identity
    torch.manual_seed(1)
    moved = peft.get_peft_model(copy.deepcopy(tiny_llama),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    masses = []
    for item in data:
        with torch.no_grad():
            logits = moved(input_ids=torch.tensor([item["input_ids"]])).logits[0, :-1]
        keep = torch.tensor(item["labels"][1:]) != -100
        masses.append(torch.softmax(logits.double(), -1).topk(2, -1).values.sum(-1)[keep])
    got = methods.calibrate_sed_threshold(moved, 0.3, 2, data=data, tokens="labels", backend="torch")
    assert got == pytest.approx(torch.quantile(torch.cat(masses), 0.3).item(), rel=1e-9)
    assert got != pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_sed_sft_top_k_gate_matches_materialized(k):
    w, batches = _heads(1)
    (h, y), = batches
    h = h.clone().requires_grad_()
    st = sftkey.logit_stats(h, w, y, topk=5, backend="torch")
    tau = methods.calibrate_sed_threshold([st], 0.5, k)
    got = methods.sed_sft(st, lam=0.7, threshold=tau, k=k)
    logp_all = torch.log_softmax(h @ w.T, -1)
    valid = y != -100
    logp = torch.where(valid, logp_all.gather(-1, y.clamp_min(0)[..., None])[..., 0], torch.zeros(()))
    gate = (logp_all.exp().topk(k, -1).values.sum(-1) < tau) & valid
    want = -logp + 0.7 * gate * (logp.exp() - 0.5) ** 2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), h)[0], torch.autograd.grad(want.sum(), h)[0],
                               rtol=1e-7, atol=1e-9)
    assert 0 < int(gate.sum()) < int(valid.sum())


def test_bad_arguments(tiny_llama):
    w, batches = _heads(1)
    (h, y), = batches
    st = sftkey.logit_stats(h, w, y, topk=2)
    with pytest.raises(ValueError, match="topk=3"):
        methods.calibrate_sed_threshold([st], 0.3, k=3)
    with pytest.raises(ValueError, match="topk=3"):
        methods.sed_sft(st, k=3)
    with pytest.raises(ValueError, match="k: expected"):
        methods.calibrate_sed_threshold([st], 0.3, k=0)
    with pytest.raises(ValueError, match="quantile"):
        methods.calibrate_sed_threshold([st], 1.5, 2)
    with pytest.raises(ValueError, match="tokens"):
        methods.calibrate_sed_threshold(tiny_llama, 0.3, 2, data=_val_data(), tokens="some")
    with pytest.raises(ValueError, match="data, tokens"):
        methods.calibrate_sed_threshold([st], 0.3, 2, data=[{}])
    with pytest.raises(ValueError, match="data, tokens"):
        methods.calibrate_sed_threshold([st], 0.3, 2, tokens="all")
    with pytest.raises(ValueError, match="data"):
        methods.calibrate_sed_threshold(tiny_llama, 0.3, 2, tokens="all")
    with pytest.raises(ValueError, match="labels"):
        methods.calibrate_sed_threshold(tiny_llama, 0.3, 2, data=[{"input_ids": [1, 2, 3]}], tokens="labels")
    with pytest.raises(TypeError, match="LogitStats"):
        methods.calibrate_sed_threshold([h], 0.3, 2)
    with pytest.raises(ValueError, match="no token"):
        methods.calibrate_sed_threshold([sftkey.logit_stats(h, w, torch.full_like(y, -100), topk=2)], 0.3, 2)
    with pytest.raises(ValueError, match="num_samples"):
        methods.calibrate_sed_threshold(tiny_llama, 0.3, 2, data=_val_data(), tokens="all", num_samples=0)
