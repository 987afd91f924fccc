"""use_fused_loss under sharded and data-parallel training, on gloo (CPU) with 2 ranks.

* FSDP2 (``fully_shard`` on each decoder layer and the root), a tiny Llama with tied and
  untied heads, the LM head in the root unit and in a unit of its own (with a tied head: the
  unit ``[embed_tokens, lm_head]``, since a shared weight lives in one unit).
* DeepSpeed ZeRO-3 (``deepspeed.initialize``), where DeepSpeed imports: the head's weight is a
  stub of ``numel() == 0`` outside the head's forward.
* ``SFTKeyTrainer`` under DDP with gradient accumulation and token weights: the weighted
  mean's denominator summed over the accumulation window and the ranks.

Each rank trains on its own token-weighted batch; the loss (averaged over the ranks) and every
gradient (gathered to the full tensor) equal one process's on the ranks' batches together.
Process start-up is most of the cost, so one ``torch.multiprocessing.spawn`` runs every case;
ranks write their results to files that the tests compare here. FSDP1 is not covered: torch
refuses to build it without an accelerator device, and accelerate enables it only there.
"""
import datetime
import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

from sftkey.methods.data import TokenWeightCollator  # noqa: E402
from sftkey.distributed import global_normalizer  # noqa: E402
from sftkey.integrations.transformers import use_fused_loss  # noqa: E402

WORLD = 2
V = 61
FSDP2_CASES = [(tied, unit) for tied in (False, True) for unit in ("root", "own")]
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _model(tied: bool) -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                      tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _batch(rank: int):
    """Rank ``r``: ``r + 2`` sequences, a prompt without labels, token weights in [0, 1)."""
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(3, V, (rank + 2, 9), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels, torch.rand(ids.shape, generator=g)


def _all_batches():
    return [torch.cat(parts) for parts in zip(*(_batch(r) for r in range(WORLD)))]


def _step(call, ids, labels, weights):
    """One loss and backward with the normalizer of the global weighted mean."""
    norm = global_normalizer(labels, token_weights=weights, shift=True)
    out = call(input_ids=ids, labels=labels, token_weights=weights, normalizer=norm)
    return out.loss


def _fsdp2_case(tied: bool, unit: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model(tied)
    use_fused_loss(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if unit == "own":
        fully_shard([model.model.embed_tokens, model.lm_head] if tied else model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = _step(model, *_batch(dist.get_rank()))
    loss.backward()
    return dict(loss=loss.detach(), grads={n: p.grad.full_tensor() for n, p in model.named_parameters()})


def _zero3_case(tied: bool):
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_grad

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of a CPU op it does not need
    model = _model(tied)
    use_fused_loss(model)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    stub = model.lm_head.weight.numel()
    loss = _step(engine, *_batch(dist.get_rank()))
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
    engine.step()
    return dict(loss=loss.detach(), grads=grads, stub_numel=stub)


def _features():
    """8 sequences for the Trainer case, token weights of one decimal in [0.1, 1.1]."""
    ids, labels, weights = _batch(6)
    return [dict(input_ids=i.tolist(), labels=y.tolist(), token_weights=(w.round(decimals=1) + 0.1).tolist())
            for i, y, w in zip(ids, labels, weights)]


class _Grads(transformers.TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def _trainer_case(out_dir):
    """SFTKeyTrainer, DDP over 2 ranks, batch 2 and 2 accumulation steps: one step on 8 sequences."""
    from sftkey.methods.trainer import SFTKeyTrainer

    features = _features()
    grads = _Grads()
    args = transformers.TrainingArguments(
        out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1, learning_rate=0.0,
        optim="sgd", max_grad_norm=0.0, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        ddp_backend="gloo", seed=0)
    trainer = SFTKeyTrainer(model=_model(False), args=args, train_dataset=features,
                            data_collator=TokenWeightCollator(pad_token_id=0), callbacks=[grads])
    out = trainer.train()
    return dict(loss=torch.tensor(out.training_loss), grads=grads.steps[0])


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        results = {("fsdp2", *case): _fsdp2_case(*case) for case in FSDP2_CASES}
        results["trainer"] = _trainer_case(os.path.join(out_dir, "trainer"))
        if HAVE_DEEPSPEED:
            results.update({("zero3", tied): _zero3_case(tied) for tied in (False, True)})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(tied: bool, ids, labels, weights):
    """One process, the ranks' batches together: loss and gradients by parameter name."""
    model = _model(tied)
    use_fused_loss(model)
    loss = model(input_ids=ids, labels=labels, token_weights=weights).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_matches(results, reference, what):
    loss, grads = reference
    mean_loss = sum(r["loss"] for r in results) / len(results)
    torch.testing.assert_close(mean_loss.float(), loss.float(), rtol=1e-5, atol=1e-6, msg=f"{what}: loss")
    for rank, res in enumerate(results):
        assert res["grads"].keys() == grads.keys(), what
        for name, want in grads.items():
            torch.testing.assert_close(res["grads"][name], want, rtol=1e-4, atol=1e-6,
                                       msg=f"{what}, rank {rank}: grad of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("tied,unit", FSDP2_CASES, ids=[f"{'tied' if t else 'untied'}-{u}" for t, u in FSDP2_CASES])
def test_fsdp2_fully_shard_matches_one_process(ranks, tied, unit):
    _assert_matches([r[("fsdp2", tied, unit)] for r in ranks], _reference(tied, *_all_batches()),
                    f"FSDP2, {'tied' if tied else 'untied'} head in the {unit} unit")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_deepspeed_zero3_matches_one_process(ranks, tied):
    results = [r[("zero3", tied)] for r in ranks]
    assert all(r["stub_numel"] == 0 for r in results)  # partitioned: the loss reads it inside the head's call
    _assert_matches(results, _reference(tied, *_all_batches()), f"ZeRO-3, {'tied' if tied else 'untied'} head")


@pytest.mark.slow
def test_trainer_weighted_mean_over_ranks_and_accumulation_equals_one_batch(ranks):
    features = _features()
    batch = TokenWeightCollator(pad_token_id=0)(features)
    model = _model(False)
    use_fused_loss(model)
    loss = model(**batch).loss
    loss.backward()
    _assert_matches([r["trainer"] for r in ranks], (loss.detach(), {n: p.grad for n, p in model.named_parameters()}),
                    "SFTKeyTrainer under DDP with gradient accumulation")


def test_a_partitioned_head_weight_is_refused():
    """Where nothing gathers the head's weight for its forward, the loss names the set-up."""
    model = _model(False)
    ids, labels, _ = _batch(0)
    use_fused_loss(model)
    model.lm_head.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside the head's hooks
    with pytest.raises(ValueError, match="ZeRO-3"):
        model(input_ids=ids, labels=labels)


def test_a_tensor_parallel_head_weight_is_refused(single_rank):
    """A head split by vocabulary rows (a DTensor inside its own forward) is not gathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = _model(False)
    ids, labels, _ = _batch(0)
    use_fused_loss(model)
    mesh = init_device_mesh("cpu", (1,))
    model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="DTensor.*vocab_parallel_linear_cross_entropy"):
        model(input_ids=ids, labels=labels)
