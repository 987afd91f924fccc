"""sftkey.methods.critical: the search finds exactly the critical tokens of a task built to have them;
batched, cached, left-padded rollouts equal one-at-a-time greedy decoding; resume; masks."""
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

import sftkey  # noqa: E402
from sftkey import methods  # noqa: E402
from sftkey.methods.critical import CriticalResult, find_critical_tokens, greedy_continue, read_results  # noqa: E402
from sftkey.methods.data import TokenWeightCollator  # noqa: E402
from program_lm import HalfSum  # noqa: E402

TASK = HalfSum()
PROBLEMS = [(37, 45), (5, 8), (0, 9), (99, 1), (250, 749), (3, 4), (64, 36), (18, 1)]


def _example(a, b):
    """The problem with its training solution (the model's greedy response, here)."""
    return {**TASK.example(a, b), "response": TASK.response(a, b)}


def _search(problems=PROBLEMS, **kwargs):
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("progress", False)
    return find_critical_tokens(TASK.model(), TASK.tokenizer, [_example(a, b) for a, b in problems], **kwargs)


def _precision_recall(results, problems, rule):
    found = {(i, t) for i, r in enumerate(results) for t in r.critical(rule)}
    truth = {(i, t) for i, (a, b) in enumerate(problems) for t in TASK.critical(a, b, rule)}
    hits = len(found & truth)
    return hits / len(found), hits / len(truth)


@pytest.mark.parametrize("rule", ["any", "all"])
def test_finds_the_constructed_critical_tokens_and_only_those(rule):
    results = _search(rule=rule)
    assert _precision_recall(results, PROBLEMS, rule) == (1.0, 1.0)
    for r, (a, b) in zip(results, PROBLEMS):
        assert r.correct
        assert r.critical() == TASK.critical(a, b, rule)
        assert r.tried == list(range(len(r.response_ids)))   # every position, EOS included
        assert r.rollouts == 2 * len(r.response_ids)
        assert r.response_ids[-1] == TASK.tokenizer.eos_token_id
        assert TASK.tokenizer.decode(r.response_ids, skip_special_tokens=True) == TASK.response(a, b)
    # the stored outcomes give the other rule without new rollouts
    other = "all" if rule == "any" else "any"
    assert [r.critical(other) for r in results] == [TASK.critical(a, b, other) for a, b in PROBLEMS]


def test_last_sum_digit_fails_under_one_alternative_only():
    (r,) = _search([(37, 45)])
    last = TASK.FILLER_BEFORE + len("82") - 1
    assert r.wrong[r.tried.index(last)] == [2]
    assert all(w == [] for t, w in zip(r.tried, r.wrong) if t not in TASK.critical(37, 45, "any"))


def test_wrong_solution_is_not_searched():
    for solution, example in (("greedy", {"prompt": TASK.prompt(37, 45), "answer": 40}),
                              ("reference", {**_example(37, 45), "answer": 40})):
        (r,) = find_critical_tokens(TASK.model(), TASK.tokenizer, [example], solution=solution, max_new_tokens=24,
                                    progress=False)
        assert not r.correct and r.answered and r.tried == [] and r.rollouts == 0
        assert r.features() is None
        assert r.untried == list(range(len(r.response_ids)))
        assert r.critical_mask(untried=0) == [0] * len(r.input_ids)


def test_reference_response_gives_the_answer():
    example = {"prompt": TASK.prompt(5, 8), "response": TASK.response(5, 8)}
    for solution in ("reference", "greedy"):
        (r,) = find_critical_tokens(TASK.model(), TASK.tokenizer, [example], solution=solution, max_new_tokens=24,
                                    progress=False)
        assert r.correct and r.critical() == TASK.critical(5, 8, "all") and r.solution == solution


def test_position_budget_start_and_sample():
    full = _search()
    late = _search(start=4)
    for f, r, (a, b) in zip(full, late, PROBLEMS):
        assert r.tried == list(range(4, len(r.response_ids)))
        assert r.critical() == [t for t in TASK.critical(a, b, "all") if t >= 4]
        assert r.rollouts == 2 * len(r.tried)
    sampled = _search(positions=3, seed=7)
    again = _search(positions=3, seed=7)
    other = _search(positions=3, seed=8)
    assert [r.tried for r in sampled] == [r.tried for r in again]
    assert [r.tried for r in sampled] != [r.tried for r in other]
    for r, (a, b) in zip(sampled, PROBLEMS):
        assert len(r.tried) == 3 and r.rollouts == 6
        assert r.critical() == [t for t in r.tried if t in TASK.critical(a, b, "all")]


def test_one_rank_and_more_ranks():
    (r2,) = _search([(37, 45)], ranks=(2,))
    assert r2.rollouts == len(r2.response_ids) and r2.critical() == TASK.critical(37, 45)
    (r3,) = _search([(37, 45)], ranks=(3,))
    assert r3.critical() == TASK.critical(37, 45, "all")


def test_resume_skips_done_examples(tmp_path):
    out = str(tmp_path / "critical.jsonl")
    first = _search(PROBLEMS[:3], output=out)
    model = TASK.model()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    rest = find_critical_tokens(model, TASK.tokenizer, [_example(a, b) for a, b in PROBLEMS],
                                max_new_tokens=24, progress=False, output=out)
    fresh = _search()
    assert rest == fresh
    assert rest[:3] == first
    assert [r.index for r in read_results(out)] == list(range(len(PROBLEMS)))
    calls.clear()
    find_critical_tokens(model, TASK.tokenizer, [_example(a, b) for a, b in PROBLEMS],
                         max_new_tokens=24, progress=False, output=out)
    assert calls == []                                    # everything was done: no forward at all
    with pytest.raises(ValueError, match="ranks"):
        _search(PROBLEMS[:1], output=out, ranks=(2,))
    with pytest.raises(ValueError, match="solution"):
        _search(PROBLEMS[:1], output=out, solution="greedy")
    (loose,) = _search(PROBLEMS[:1], output=out, rule="any")             # read back, the rule re-applied
    assert loose.rollouts == first[0].rollouts and loose.critical() == TASK.critical(*PROBLEMS[0], "any")
    line = json.loads(open(out).readline())
    assert set(line) >= {"index", "tried", "wrong", "rollouts", "prompt_ids", "response_ids"}


def test_progress_bar_runs(capsys):
    _search(PROBLEMS[:1], progress=True)
    assert "critical tokens" in capsys.readouterr().err


def test_mask_and_features_feed_cft_and_the_collator():
    (r,) = _search([(37, 45)])
    mask, feats = r.critical_mask(), r.features()
    assert len(mask) == len(r.input_ids) == len(feats["labels"])
    crit = [len(r.prompt_ids) + t for t in r.critical()]
    assert [i for i, m in enumerate(mask) if m] == crit
    assert [i for i, y in enumerate(feats["labels"]) if y != -100] == crit
    batch = TokenWeightCollator.from_tokenizer(TASK.tokenizer)([feats, _search([(5, 8)])[0].features()])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*batch["input_ids"].shape, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(HalfSum.TOKENS), 8, generator=g, dtype=torch.float64)
    st = sftkey.logit_stats(hidden[:, :-1], weight, batch["labels"][:, 1:])
    got = methods.reduce(methods.sft(st), st, token_weights=batch["token_weights"][:, 1:].double(), reduction="none")
    logp = torch.log_softmax(hidden[:, :-1] @ weight.T, -1)
    y = batch["labels"][:, 1:]
    want = torch.where(y != -100, -logp.gather(-1, y.clamp_min(0)[..., None])[..., 0], torch.zeros(()))
    torch.testing.assert_close(got, want.to(got.dtype))
    assert int((got != 0).sum()) == len(r.critical()) + len(TASK.critical(5, 8, "all"))


def test_result_round_trips_through_json():
    (r,) = _search([(64, 36)])
    assert CriticalResult(**json.loads(json.dumps(r.__dict__))) == r


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rule": "most"}, ValueError, "rule"),
    ({"solution": "best"}, ValueError, "solution"),
    ({"ranks": ()}, TypeError, "ranks"),
    ({"ranks": (1, 2)}, ValueError, "ranks"),
    ({"ranks": (2, 2)}, ValueError, "ranks"),
    ({"positions": 0}, ValueError, "positions"),
    ({"start": -1}, ValueError, "start"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"batch_size": 1.5}, TypeError, "batch_size"),
    ({"checker": 3}, TypeError, "checker"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _search(PROBLEMS[:1], **kwargs)


def test_bad_examples():
    with pytest.raises(ValueError, match="prompt"):
        find_critical_tokens(TASK.model(), TASK.tokenizer, [{"answer": 1}], progress=False)
    with pytest.raises(ValueError, match="answer"):
        find_critical_tokens(TASK.model(), TASK.tokenizer, [{"prompt": "1+2="}], progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        find_critical_tokens(TASK.model(), TASK.tokenizer, [{"prompt": "", "answer": 1}], progress=False)


# ---- a real model: batched, cached, left-padded rollouts against plain greedy decoding

@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(HalfSum.TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).double().eval()


def _greedy_without_cache(model, prefix, budget, eos):
    ids = list(prefix)
    for _ in range(budget):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prefix):]


def test_batched_left_padded_rollouts_equal_plain_greedy(llama):
    rng = random.Random(0)
    prefixes = [[rng.randrange(2, len(HalfSum.TOKENS)) for _ in range(rng.randint(1, 12))] for _ in range(9)]
    budgets = [rng.randint(0, 10) for _ in prefixes]
    prefixes[3] = prefixes[3] + [1]                       # ends in EOS: nothing to continue
    batched = greedy_continue(llama, prefixes, budgets, pad_id=0, eos_id=1, batch_size=4)
    single = [greedy_continue(llama, [p], [b], pad_id=0, eos_id=1)[0] for p, b in zip(prefixes, budgets)]
    plain = [_greedy_without_cache(llama, p, b, 1) if p[-1] != 1 else [] for p, b in zip(prefixes, budgets)]
    assert batched == single == plain
    assert [len(c) for c in batched] != [0] * len(batched)
    assert all(len(c) <= b for c, b in zip(batched, budgets))


def test_search_batched_equals_one_at_a_time(llama):
    problems = [{"prompt": TASK.prompt(a, b)} for a, b in PROBLEMS[:4]]
    prompts = [list(TASK.tokenizer(p["prompt"])["input_ids"]) for p in problems]
    greedy = greedy_continue(llama, prompts, [10] * len(prompts), pad_id=0, eos_id=1)
    for p, g in zip(problems, greedy):
        p["answer"] = TASK.tokenizer.decode(g, skip_special_tokens=True)[-2:]

    def checker(text, reference):
        return text[-2:] == reference

    runs = [find_critical_tokens(llama, TASK.tokenizer, problems, solution="greedy", checker=checker,
                                 max_new_tokens=10, batch_size=bs, progress=False) for bs in (1, 7, 64)]
    assert runs[0] == runs[1] == runs[2]
    assert all(r.correct for r in runs[0])
    assert sum(r.rollouts for r in runs[0]) == 2 * sum(len(r.response_ids) for r in runs[0])


# ---- issue 25: the paper's rule and solution, untried positions, unanswerable responses

def test_defaults_are_the_papers_rule_on_the_training_solution():
    import inspect
    params = inspect.signature(find_critical_tokens).parameters
    assert params["rule"].default == "all" and params["solution"].default == "reference"
    results = _search(PROBLEMS[:3])
    assert [r.critical() for r in results] == [TASK.critical(a, b, "all") for a, b in PROBLEMS[:3]]


def test_reference_solution_is_the_training_one_not_the_greedy_one():
    """A right training solution the model would not write (other filler): the reference
    search perturbs it, teacher-forced; the greedy search perturbs the model's own."""
    training = ",,82~~~<Answer>41</Answer>"
    example = {"prompt": TASK.prompt(37, 45), "response": training, "answer": 41}
    (ref,) = find_critical_tokens(TASK.model(), TASK.tokenizer, [example], max_new_tokens=24, progress=False)
    (greedy,) = find_critical_tokens(TASK.model(), TASK.tokenizer, [example], solution="greedy",
                                     max_new_tokens=24, progress=False)
    decode = TASK.tokenizer.decode
    assert decode(ref.response_ids, skip_special_tokens=True) == training
    assert decode(greedy.response_ids, skip_special_tokens=True) == TASK.response(37, 45)
    assert ref.correct and ref.critical() == greedy.critical() == TASK.critical(37, 45, "all")
    assert ref.generated_tokens < greedy.generated_tokens          # no greedy decode for the reference
    with pytest.raises(ValueError, match="max_new_tokens"):
        find_critical_tokens(TASK.model(), TASK.tokenizer, [example], max_new_tokens=10, progress=False)
    with pytest.raises(ValueError, match="'response'"):
        find_critical_tokens(TASK.model(), TASK.tokenizer, [TASK.example(37, 45)], progress=False)


def test_untried_positions_are_neither_critical_nor_not():
    (r,) = _search([(37, 45)], positions=5, seed=3)
    assert len(r.untried) == len(r.response_ids) - 5 and not set(r.untried) & set(r.tried)
    with pytest.raises(ValueError, match="untried"):
        r.critical_mask()
    with pytest.raises(ValueError, match="untried"):
        r.features()
    n = len(r.prompt_ids)
    for value in (0, 1):
        mask = r.critical_mask(untried=value)
        assert [mask[n + t] for t in r.untried] == [value] * len(r.untried)
        assert [mask[n + t] for t in r.tried] == [int(t in r.critical()) for t in r.tried]
    (full,) = _search([(37, 45)])
    assert full.untried == [] and full.critical_mask() == full.critical_mask(untried=1)


def test_unanswerable_rollouts_are_counted():
    """A broken <Answer> or </Answer> tag leaves no answer: 2 positions x 2 ranks per problem."""
    results = _search(PROBLEMS[:2])
    assert [r.unanswered for r in results] == [4, 4]
    assert all(r.answered for r in results)


def test_a_search_without_any_readable_answer_raises():
    """The issue's case: a decode that loses what the checker looks for."""
    def lossy(ids):
        return TASK.tokenizer.decode(ids, skip_special_tokens=True).replace("<Answer>", " ")

    for solution in ("reference", "greedy"):
        with pytest.raises(ValueError, match="none of the 2 responses checked had an answer"):
            _search(PROBLEMS[:2], decode=lossy, solution=solution)


def test_results_written_before_solution_existed_read_as_greedy(tmp_path):
    out = tmp_path / "old.jsonl"
    (r,) = _search(PROBLEMS[:1], solution="greedy")
    line = {k: v for k, v in r.__dict__.items() if k not in ("solution", "answered", "unanswered")}
    out.write_text(json.dumps(line) + "\n")
    (old,) = read_results(str(out))
    assert old.solution == "greedy"
    with pytest.raises(ValueError, match="solution"):
        _search(PROBLEMS[:1], output=str(out))                 # the default, reference, does not resume it
