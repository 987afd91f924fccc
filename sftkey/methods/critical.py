"""CFT's critical tokens by counterfactual rollouts (arXiv 2510.10974).

For each problem, take a right solution ``y``: the training solution (``solution="reference"``,
the default: the paper perturbs the training data's solution, teacher-forced up to the
substituted position) or the model's own greedy one (``solution="greedy"``, kept when its final
answer is right). At each tried position ``t`` put an alternative token ``y'_t`` (the model's 2nd
and 3rd most probable there, given ``y_<t``) and continue greedily to the end. Token ``t`` is
*critical* when every alternative makes the final answer wrong, the paper's definition
``c_t = 1[for all y'_t in A_t: Correct(y_<t, y'_t, y_>t) = 0]``, with ``y_>t`` the model's
continuation. CFT then trains on the critical tokens only (the paper: under 12% of them).

Where the paper is silent, the choices here (each a parameter of :func:`find_critical_tokens`):

* ``rule="all"`` is the paper's; ``"any"`` (one wrong continuation suffices) marks more
  tokens. Every alternative is rolled out either way, and each outcome is stored, so
  :meth:`CriticalResult.critical` re-applies either rule without new rollouts.
* The alternatives of rank ``r`` are the ``r``-th most probable tokens at that position
  when the solution's token is the 1st (always so for a greedy solution), else the
  ``(r - 1)``-th most probable among the others.
* The tried positions: every solution token including the EOS, or those after the first
  ``start``, or a seeded sample of ``positions`` of them per example. The others are
  *untried*, neither critical nor not: :meth:`CriticalResult.critical_mask` asks the caller
  what to make of them (``untried=0`` or ``1``).
* A continuation may use what is left of ``max_new_tokens`` (the solution's budget).
* A response without an answer (the checker returns None) is wrong, and counted: a search
  where no checked response has an answer raises (the checker and the decode disagree).

Cost is rollouts: ``len(ranks)`` continuations per tried position, a generate call each
(batched, with the KV cache), plus one scoring forward per example (and the greedy decode
with ``solution="greedy"``).

Output: :class:`CriticalResult` per example; ``critical_mask`` is aligned with
``input_ids = prompt_ids + response_ids`` like :mod:`sftkey.methods.keys`' token weights (a weight
per token, the loss shifts), and :meth:`CriticalResult.features` gives the
``input_ids``/``attention_mask``/``labels``/``token_weights`` that the collators and
``methods.reduce(methods.sft(st), st, token_weights=...)`` take. A JSONL ``output`` makes the
search resumable.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from .answers import AnswerChecker, Reference
from .keys import IGNORE_INDEX, prompt_ids

Checker = Callable[[str, Reference], Optional[bool]]

RULES = ("all", "any")
SOLUTIONS = ("reference", "greedy")


@dataclass
class CriticalResult:
    """One example's search. ``response_ids``: the solution perturbed (the training solution,
    or the greedy one); ``correct``: whether its answer was right (when not, nothing was
    tried); ``answered``: whether it had an answer at all. ``tried``: response positions
    tried; ``wrong[i]``: the ranks whose continuation at ``tried[i]`` got the answer wrong;
    ``rollouts``: continuations generated; ``unanswered``: those without an answer (counted
    as wrong); ``generated_tokens``: tokens generated, greedy decode included."""

    index: int
    prompt_ids: list[int]
    response_ids: list[int]
    correct: bool
    ranks: list[int]
    tried: list[int] = field(default_factory=list)
    wrong: list[list[int]] = field(default_factory=list)
    rollouts: int = 0
    generated_tokens: int = 0
    rule: str = "all"
    solution: str = "reference"
    answered: bool = True
    unanswered: int = 0

    def critical(self, rule: Optional[str] = None) -> list[int]:
        """Response positions that are critical under ``rule`` (default: the search's)."""
        rule = _check_rule(self.rule if rule is None else rule)
        need = 1 if rule == "any" else len(self.ranks)
        return [t for t, w in zip(self.tried, self.wrong) if len(w) >= need]

    @property
    def untried(self) -> list[int]:
        """Response positions not tried (before ``start``, or left out of the ``positions``
        sample; all of them when the solution was wrong): neither critical nor not."""
        done = set(self.tried)
        return [t for t in range(len(self.response_ids)) if t not in done]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def critical_mask(self, rule: Optional[str] = None, untried: Optional[int] = None) -> list[int]:
        """Per token of :attr:`input_ids`: 1 on the critical response tokens, 0 on the other
        tried ones and the prompt, and ``untried`` (0: leave them untrained, 1: train them) on
        the :attr:`untried` positions; a ``ValueError`` if there are some and ``untried`` is
        None (an untried token is not a non-critical one)."""
        skipped = self.untried
        if untried not in (None, 0, 1) or isinstance(untried, bool):
            raise ValueError(f"untried: expected 0, 1 or None, got {untried!r}")
        if skipped and untried is None:
            raise ValueError(f"untried: {len(skipped)} of the {len(self.response_ids)} response positions of "
                             f"examples[{self.index}] were not tried (start, positions); pass untried=0 to leave "
                             "them untrained or untried=1 to train them")
        mask = [0] * len(self.input_ids)
        for t in skipped:
            mask[len(self.prompt_ids) + t] = untried
        for t in self.critical(rule):
            mask[len(self.prompt_ids) + t] = 1
        return mask

    def features(self, rule: Optional[str] = None, untried: Optional[int] = None) -> Optional[dict[str, list]]:
        """``input_ids``, ``attention_mask``, ``labels`` (-100 off the masked tokens) and
        ``token_weights`` (:meth:`critical_mask` with ``rule`` and ``untried``), as
        :func:`sftkey.methods.keys.encode_example` returns them; None when the solution was
        wrong (CFT keeps only right ones)."""
        if not self.correct:
            return None
        mask, ids = self.critical_mask(rule, untried), self.input_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)],
                "token_weights": [float(m) for m in mask]}


def _check_rule(rule: Any) -> str:
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    return rule


def _check_solution(solution: Any) -> str:
    if solution not in SOLUTIONS:
        raise ValueError(f"solution: expected one of {SOLUTIONS}, got {solution!r}")
    return solution


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: expected >= {low}, got {value}")


def _check_ranks(ranks: Any) -> list[int]:
    if not isinstance(ranks, (list, tuple)) or not ranks:
        raise TypeError(f"ranks: expected a non-empty list of ints >= 2, got {ranks!r}")
    for r in ranks:
        _check_int("ranks", r, 2)
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks: expected distinct ranks, got {ranks!r}")
    return sorted(ranks)


def read_results(path: str) -> list[CriticalResult]:
    """The results stored in a JSONL ``output`` of :func:`find_critical_tokens` (a line without
    ``solution`` is from before it existed, when the search perturbed the greedy solution)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [CriticalResult(**{"solution": "greedy", **json.loads(line)}) for line in f if line.strip()]


def _pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids and attention mask of ``seqs``, padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _until_eos(ids: Sequence[int], eos_id: Optional[int], budget: int) -> list[int]:
    """``ids`` cut after the first EOS and to ``budget`` tokens."""
    out = []
    for t in list(ids)[:budget]:
        out.append(t)
        if t == eos_id:
            break
    return out


@torch.no_grad()
def greedy_continue(model, prefixes: Sequence[Sequence[int]], budgets: Sequence[int], *, pad_id: int,
                    eos_id: Optional[int], batch_size: int = 16) -> list[list[int]]:
    """Greedy continuation of each prefix (token ids), at most ``budgets[i]`` new tokens,
    through the EOS; a prefix ending in EOS or with budget 0 gets none. Prefixes of similar
    length are batched (``batch_size`` a call), padded on the left with an attention mask,
    so ``generate`` derives the position ids from the mask and uses its KV cache; each
    result equals the prefix's own un-batched greedy continuation."""
    out: list[list[int]] = [[] for _ in prefixes]
    todo = [i for i, p in enumerate(prefixes) if budgets[i] > 0 and not (p and p[-1] == eos_id)]
    todo.sort(key=lambda i: len(prefixes[i]))
    device = next(model.parameters()).device
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        ids, mask = _pad_left([prefixes[i] for i in chunk], pad_id, device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(budgets[i] for i in chunk),
                             do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad_id,
                             eos_token_id=eos_id, top_k=None, top_p=None, temperature=None)
        for row, i in zip(gen[:, ids.shape[1]:].tolist(), chunk):
            out[i] = _until_eos(row, eos_id, budgets[i])
    return out


@torch.no_grad()
def _alternatives(model, prompt_ids: list[int], response_ids: list[int], max_rank: int) -> list[list[int]]:
    """Per response position, the ``max_rank - 1`` most probable tokens other than the
    response's own, most probable first (one forward over the whole sequence)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids], device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    top = logits[len(prompt_ids) - 1:-1].topk(min(max_rank, logits.shape[-1]), dim=-1).indices.tolist()
    return [[t for t in row if t != own][:max_rank - 1] for row, own in zip(top, response_ids)]


def _positions(n: int, start: int, sample: Optional[int], rng: random.Random) -> list[int]:
    candidates = list(range(min(start, n), n))
    if sample is not None and sample < len(candidates):
        candidates = sorted(rng.sample(candidates, sample))
    return candidates


def _reference(example: Mapping[str, Any], i: int, checker: Checker) -> Reference:
    if "answer" in example:
        return example["answer"]
    if "response" in example and isinstance(checker, AnswerChecker):
        found = checker.extract(example["response"])
        if found is not None:
            return found
        raise ValueError(f"examples[{i}]: no answer found in its 'response'")
    raise ValueError(f"examples[{i}]: expected an 'answer' (or, with the default checker, a 'response')")


def _verdict(checker: Checker, text: str, reference: Reference) -> Optional[bool]:
    """The checker's verdict: True, False, or None where the text has no answer."""
    verdict = checker(text, reference)
    return None if verdict is None else bool(verdict)


def find_critical_tokens(
    model,
    tokenizer,
    examples: Iterable[Mapping[str, Any]],
    *,
    solution: str = "reference",
    checker: Optional[Checker] = None,
    ranks: Sequence[int] = (2, 3),
    rule: str = "all",
    positions: Optional[int] = None,
    start: int = 0,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    output: Optional[str] = None,
    progress: bool = True,
    decode: Optional[Callable[[list[int]], str]] = None,
) -> list[CriticalResult]:
    """CFT's counterfactual search over ``examples``: mappings with ``"prompt"``, the training
    solution ``"response"`` (needed with ``solution="reference"``) and the ``"answer"`` (else
    the default checker extracts it from the response).

    ``model``: a Hugging Face causal LM (``generate``); ``tokenizer``: its tokenizer (the
    prompt is encoded with its leading special tokens, :func:`sftkey.methods.keys.prompt_ids`;
    the training solution without them, then the EOS; ``pad_token_id`` or else
    ``eos_token_id`` pads). ``solution``: ``"reference"`` perturbs the training solution
    (the paper), ``"greedy"`` the model's own greedy one. ``checker(response_text, reference)
    -> bool | None`` (None: no answer), default :class:`~sftkey.methods.answers.AnswerChecker`
    (``sftkey.methods.keys`` patterns, numbers compared as numbers). ``ranks``: the
    alternatives tried (2 = second most probable); ``rule``: ``"all"`` (the paper's) or
    ``"any"`` of them must fail. Position budget: only response positions ``>= start``, and
    at most ``positions`` of those per example, sampled with ``seed`` (None: all); the rest
    are untried. ``max_new_tokens``: the solution's token budget (a training solution longer
    than it is refused). ``decode``: ids -> text for the checker (default
    ``tokenizer.decode(ids, skip_special_tokens=True)``).

    ``output``: a JSONL file, one :class:`CriticalResult` a line, appended after each
    example; examples whose index is already there are not searched again (resume with the
    same examples and settings; other ``ranks`` or ``solution`` are refused, ``rule`` is
    re-applied). Returns the results of every example, in order. Raises ``ValueError`` at the
    end when no checked response had an answer (the decode or the checker cannot read them).
    """
    solution = _check_solution(solution)
    ranks = _check_ranks(ranks)
    rule = _check_rule(rule)
    _check_int("positions", positions, 1, allow_none=True)
    _check_int("start", start, 0)
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("batch_size", batch_size, 1)
    checker = AnswerChecker() if checker is None else checker
    if not callable(checker):
        raise TypeError(f"checker: expected a callable (response, reference) -> bool, got {type(checker).__name__}")
    decode = decode or (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("tokenizer: needs a pad_token_id or an eos_token_id to pad the batches")
    examples = list(examples)
    done = {r.index: r for r in read_results(output)} if output else {}
    for r in done.values():
        if r.ranks != ranks or r.solution != solution:
            raise ValueError(f"output: {output} holds results for ranks {r.ranks} and solution {r.solution!r}, not "
                             f"{ranks} and {solution!r}; resume with the settings it was written with, or write to "
                             "a new file")
        r.rule = rule
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(examples), initial=sum(i in done for i in range(len(examples))), desc="critical tokens")
    was_training = model.training
    model.eval()
    try:
        for i, example in enumerate(examples):
            if i in done:
                continue
            if not isinstance(example, Mapping) or "prompt" not in example:
                raise ValueError(f"examples[{i}]: expected a mapping with a 'prompt'")
            reference = _reference(example, i, checker)
            prompt = prompt_ids(tokenizer, example["prompt"])
            if not prompt:
                raise ValueError(f"examples[{i}]: its 'prompt' encodes to no tokens (the first response "
                                 "token needs a position to be predicted from)")
            if solution == "reference":
                if not isinstance(example.get("response"), str):
                    raise ValueError(f"examples[{i}]: solution='reference' perturbs the training solution, its "
                                     "'response' (a string); give one, or pass solution='greedy'")
                response = list(tokenizer(example["response"], add_special_tokens=False)["input_ids"])
                response += [] if eos_id is None else [eos_id]
                if len(response) > max_new_tokens:
                    raise ValueError(f"max_new_tokens: examples[{i}]'s solution has {len(response)} tokens, more "
                                     f"than the budget {max_new_tokens} its continuations get")
                generated = 0
            else:
                response = greedy_continue(model, [prompt], [max_new_tokens], pad_id=pad_id, eos_id=eos_id)[0]
                generated = len(response)
            result = _search_one(model, i, prompt, response, reference, checker, decode, ranks, rule, positions,
                                 start, random.Random(f"{seed}:{i}"), max_new_tokens, batch_size, pad_id, eos_id)
            result.solution, result.generated_tokens = solution, result.generated_tokens + generated
            done[i] = result
            if output:
                with open(output, "a", encoding="utf-8") as f:
                    f.write(json.dumps(asdict(result)) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rollouts=sum(r.rollouts for r in done.values()),
                                unanswered=sum(r.unanswered + (not r.answered) for r in done.values()))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    results = [done[i] for i in range(len(examples))]
    _refuse_unreadable(results, decode)
    return results


def _refuse_unreadable(results: list[CriticalResult], decode) -> None:
    """A ``ValueError`` when no checked response of the search had an answer."""
    checked = len(results) + sum(r.rollouts for r in results)
    unanswered = sum((not r.answered) + r.unanswered for r in results)
    if results and unanswered == checked:
        sample = decode(results[0].response_ids)
        raise ValueError(f"checker: none of the {checked} responses checked had an answer (e.g. {sample[-120:]!r}); "
                         "the decode may lose what the checker looks for (newlines, tags): pass decode= or checker=. "
                         "The results are in output, if given")


def _search_one(model, index, prompt_ids, response, reference, checker, decode, ranks, rule, positions, start, rng,
                max_new_tokens, batch_size, pad_id, eos_id) -> CriticalResult:
    """The search on one example's solution ``response``: check it, then the rollouts of every tried position."""
    verdict = _verdict(checker, decode(response), reference)
    result = CriticalResult(index, prompt_ids, response, bool(verdict), ranks, rule=rule, answered=verdict is not None)
    if not result.correct or not response:
        return result
    tried = _positions(len(response), start, positions, rng)
    alternatives = _alternatives(model, prompt_ids, response, max(ranks))
    jobs = [(t, r) for t in tried for r in ranks if r - 2 < len(alternatives[t])]
    prefixes = [prompt_ids + response[:t] + [alternatives[t][r - 2]] for t, r in jobs]
    budgets = [max_new_tokens - t - 1 for t, _ in jobs]
    continued = greedy_continue(model, prefixes, budgets, pad_id=pad_id, eos_id=eos_id, batch_size=batch_size)
    wrong: dict[int, list[int]] = {t: [] for t in tried}
    for (t, r), prefix, cont in zip(jobs, prefixes, continued):
        verdict = _verdict(checker, decode(prefix[len(prompt_ids):] + cont), reference)
        result.unanswered += verdict is None
        if not verdict:
            wrong[t].append(r)
    result.tried = tried
    result.wrong = [wrong[t] for t in tried]
    result.rollouts = len(jobs)
    result.generated_tokens += sum(len(c) for c in continued)
    return result
