"""use_fused_loss on tiny Hugging Face causal LMs: loss and every gradient equal the model's own."""
import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sftkey  # noqa: E402
from sftkey.integrations.transformers import is_patched, use_fused_loss  # noqa: E402

V = 61
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "gemma2_softcap": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=1.5, head_dim=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "cohere_scale": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.3)),
    "granite_scaling": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=3.0)),
    "phi_bias": ("PhiConfig", "PhiForCausalLM", {}),
    "mixtral_aux": ("MixtralConfig", "MixtralForCausalLM",
                    dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)),
}


def make_model(arch, seed=0):
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    ids[1, 8:] = 0
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[mask == 0] = -100
    return ids, mask, labels


def loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("num_items", [None, 13])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_loss_and_gradients_match_the_model(arch, num_items):
    model = make_model(arch)
    ids, mask, labels = make_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(num_items)
    want = loss_and_grads(model, **kwargs)
    with use_fused_loss(model):
        got = loss_and_grads(model, **kwargs)
        assert got[0].logits is None
    assert_same(got, want)


def test_no_vocabulary_sized_logits_are_built():
    model = make_model("gemma2_softcap")
    ids, mask, labels = make_batch()
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    use_fused_loss(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert out.logits is None and "logits" not in out
    assert shapes == [(*ids.shape, 2), ()]  # the head returned the probe, not [B, T, V], then the loss


def test_shift_labels_are_taken_as_given():
    model = make_model("llama")
    ids, mask, labels = make_batch()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    want = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    use_fused_loss(model)
    assert_same(loss_and_grads(model, input_ids=ids, attention_mask=mask, shift_labels=shifted), want)


def test_token_weights_pass_through_model_kwargs():
    model = make_model("gemma2_softcap")
    ids, mask, labels = make_batch()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    # position t predicts label t + 1, weighted by token_weights[t + 1]
    y, a = labels[:, 1:], weights[:, 1:].double()
    valid = y != -100
    ce = -torch.log_softmax(logits[:, :-1], -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    want = (ce * a)[valid].sum() / a[valid].sum()
    use_fused_loss(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, token_weights=weights)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    # entropy_weights and other options pass through as well: compare with the direct call
    direct = model(input_ids=ids, attention_mask=mask, labels=labels, token_weights=weights,
                   entropy_weights=0.1, z_loss=1e-3, dft=True)
    assert not torch.isclose(direct.loss, out.loss)


def test_weighted_call_takes_its_normalizer_and_refuses_a_count():
    """num_items_in_batch is Trainer's count of labelled tokens: the divisor of an unweighted call
    only. A weighted call divides by its normalizer, and refuses a count without one."""
    model = make_model("llama")
    ids, mask, labels = make_batch()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(4))
    use_fused_loss(model)
    summed = model(input_ids=ids, attention_mask=mask, labels=labels, token_weights=weights).loss
    total = (weights[:, 1:] * (labels[:, 1:] != -100)).sum()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, token_weights=weights, normalizer=2 * total,
                num_items_in_batch=torch.tensor(13))
    torch.testing.assert_close(out.loss, summed / 2)
    with pytest.raises(ValueError, match="token_weights with num_items_in_batch and no normalizer.*FusedLossMixin"):
        model(input_ids=ids, attention_mask=mask, labels=labels, token_weights=weights,
              num_items_in_batch=torch.tensor(13))
    with pytest.raises(ValueError, match="class_weights with num_items_in_batch"):
        model(input_ids=ids, attention_mask=mask, labels=labels, class_weights=torch.rand(V),
              num_items_in_batch=torch.tensor(13))


def test_patch_time_defaults_and_per_call_override():
    model = make_model("llama")
    ids, mask, labels = make_batch()
    plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    use_fused_loss(model, dft=True)
    dft = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert dft < plain
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels, dft=False).loss, plain)
    with pytest.raises(TypeError, match="unknown options"):
        use_fused_loss(make_model("llama"), temperature=2.0)


def test_return_stats_and_tuple_output():
    model = make_model("llama")
    ids, mask, labels = make_batch()
    use_fused_loss(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_stats=True)
    stats = out.stats
    assert isinstance(stats, sftkey.LossStats) and stats.entropy.shape == labels.shape
    valid = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1) != -100
    torch.testing.assert_close(-stats.target_logprob[valid].mean(), out.loss)
    assert not stats.correct[~valid].any()
    tup = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(tup[0], out.loss)
    assert all(t.shape[-1] != 2 for t in tup[1:] if torch.is_tensor(t))  # the probe logits are not returned


def test_without_labels_the_model_runs_unchanged_and_remove_restores():
    model = make_model("gemma2_softcap")
    ids, mask, labels = make_batch()
    ref = model(input_ids=ids, attention_mask=mask)
    handle = use_fused_loss(model)
    assert is_patched(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref.logits)
    with pytest.raises(ValueError, match="without labels"):
        model(input_ids=ids, token_weights=torch.ones_like(ids, dtype=torch.float))
    with pytest.raises(ValueError, match="already patched"):
        use_fused_loss(model)
    out = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    handle.remove()
    assert not is_patched(model) and "forward" not in vars(model)
    assert model(input_ids=ids, labels=labels).logits.shape == (*ids.shape, V)


def test_signature_lists_loss_options_for_trainer_column_filtering():
    model = make_model("llama")
    use_fused_loss(model)
    params = inspect.signature(model.forward).parameters
    for name in ("input_ids", "labels", "token_weights", "entropy_weights", "normalizer", "num_items_in_batch",
                 "kwargs"):
        assert name in params
    assert "self" not in params


def test_deepcopy_of_patched_model_uses_its_own_weights():
    model = make_model("llama")
    ids, mask, labels = make_batch()
    use_fused_loss(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    twin(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert twin.lm_head.weight.grad is not None and model.lm_head.weight.grad is None


def test_unknown_logit_post_processing_is_refused():
    class Shifted(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 1.0
            return out

    model = Shifted(transformers.LlamaConfig(**COMMON))
    ids, mask, labels = make_batch()
    use_fused_loss(model)
    with pytest.raises(NotImplementedError, match="other than a scale"):
        model(input_ids=ids, labels=labels)


peft = pytest.importorskip("peft")


def _peft(model, **config):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_peft_lora_model_matches(modules_to_save):
    ids, mask, labels = make_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    model = _peft(make_model("qwen2"), target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save)
    want = loss_and_grads(model, **kwargs)
    handle = use_fused_loss(model)
    assert handle.model is model.get_base_model()
    got = loss_and_grads(model, **kwargs)
    assert got[0].logits is None
    assert_same(got, want)
    assert any("lora_A" in n for n in got[1]) and (modules_to_save is None) == ("lm_head" not in str(list(got[1])))


def test_lora_on_lm_head_is_refused_when_patching():
    model = _peft(make_model("llama"), target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="adapter"):
        use_fused_loss(model)
    assert not is_patched(model)
    # an adapter put on the head after patching is refused at the first labelled call
    ids, mask, labels = make_batch()
    base = make_model("llama")
    use_fused_loss(base)
    late = _peft(base, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="adapter"):
        late(input_ids=ids, labels=labels)


def _call_and_grads(call, model, **kwargs):
    """Like :func:`loss_and_grads`, with the gradients read from ``model`` (``call`` may wrap it)."""
    model.zero_grad(set_to_none=True)
    out = call(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_torch_compile_of_a_patched_model_matches_without_graph_breaks():
    from torch._dynamo.backends.debugging import ExplainWithBackend

    model = make_model("llama")
    ids, mask, labels = make_batch()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5))
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, token_weights=weights,
                  normalizer=torch.tensor(9.5))
    use_fused_loss(model)
    want = _call_and_grads(model, model, **kwargs)  # eager; also measures the logit scale
    torch._dynamo.reset()
    explain = ExplainWithBackend("aot_eager")
    compiled = torch.compile(model, backend=explain)
    for _ in range(2):  # the second call runs the cached graphs
        got = _call_and_grads(compiled, model, **kwargs)
        assert got[0].logits is None
        assert_same(got, want)
    report = explain.output()  # the body, the head and the fused loss (sftkey.core.compiled's ops) in one graph
    assert report.graph_break_count == 0, [(r.reason, [f"{f.filename}:{f.lineno}" for f in r.user_stack])
                                           for r in report.break_reasons]


@pytest.mark.slow
def test_model_compile_of_a_patched_model_matches():
    model = make_model("gemma2_softcap")
    ids, mask, labels = make_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    want = loss_and_grads(model, **kwargs)
    use_fused_loss(model)
    torch._dynamo.reset()
    model.compile(backend="eager")
    for _ in range(2):
        got = loss_and_grads(model, **kwargs)
        assert got[0].logits is None
        assert_same(got, want)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, V)  # without labels: the logits
    first, second = (model(**kwargs, return_stats=True) for _ in range(2))
    assert type(first) is type(second) and first.stats.predicted.shape == labels.shape  # one output type, made once
