"""CFT's critical tokens by counterfactual rollouts (arXiv 2510.10974).

For each problem: greedy-decode a response with the model; keep it when its final answer is
right; at each tried position ``t`` of the response, replace token ``t`` by the model's
2nd and 3rd most probable tokens there and continue greedily to the end; token ``t`` is
*critical* when a replacement makes the final answer wrong. CFT then trains on the critical
tokens only.

Where the paper is silent, the choices here (each a parameter of :func:`find_critical_tokens`):

* ``rule="any"``: one wrong continuation makes the token critical (the paper's "a
  substitution makes the answer wrong"); ``"all"`` asks every alternative to fail (fewer,
  surer critical tokens). Every alternative is rolled out either way, and each outcome is
  stored, so :meth:`CriticalResult.critical` re-applies either rule without new rollouts.
* The alternatives of rank ``r`` are the ``r``-th most probable tokens at that position
  when the response token is the 1st (always so for a greedy response), else the
  ``(r - 1)``-th most probable among the others.
* The tried positions: every response token including the EOS, or those after the first
  ``start``, or a seeded sample of ``positions`` of them per example.
* A continuation may use what is left of ``max_new_tokens`` (the response's budget).

Cost is rollouts: ``len(ranks)`` continuations per tried position, a generate call each
(batched, with the KV cache), plus one scoring forward and the greedy decode per example.

Output: :class:`CriticalResult` per example; ``critical_mask`` is aligned with
``input_ids = prompt_ids + response_ids`` like :mod:`sftkey.methods.keys`' token weights (a weight
per token, the loss shifts), and :meth:`CriticalResult.features` gives the
``input_ids``/``attention_mask``/``labels``/``token_weights`` that the collators and
``methods.cft(st, mask[..., 1:])`` take. A JSONL ``output`` makes the search resumable.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from .answers import AnswerChecker, Reference
from .keys import IGNORE_INDEX

Checker = Callable[[str, Reference], bool]

RULES = ("any", "all")


@dataclass
class CriticalResult:
    """One example's search. ``tried``: response positions tried; ``wrong[i]``: the ranks
    whose continuation at ``tried[i]`` got the answer wrong; ``rollouts``: continuations
    generated; ``generated_tokens``: tokens generated, greedy decode included; ``correct``:
    whether the greedy response was right (when not, nothing was tried)."""

    index: int
    prompt_ids: list[int]
    response_ids: list[int]
    correct: bool
    ranks: list[int]
    tried: list[int] = field(default_factory=list)
    wrong: list[list[int]] = field(default_factory=list)
    rollouts: int = 0
    generated_tokens: int = 0
    rule: str = "any"

    def critical(self, rule: Optional[str] = None) -> list[int]:
        """Response positions that are critical under ``rule`` (default: the search's)."""
        rule = _check_rule(self.rule if rule is None else rule)
        need = 1 if rule == "any" else len(self.ranks)
        return [t for t, w in zip(self.tried, self.wrong) if len(w) >= need]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def critical_mask(self, rule: Optional[str] = None) -> list[int]:
        """0/1 per token of :attr:`input_ids`: 1 on the critical response tokens."""
        mask = [0] * len(self.input_ids)
        for t in self.critical(rule):
            mask[len(self.prompt_ids) + t] = 1
        return mask

    def features(self, rule: Optional[str] = None) -> Optional[dict[str, list]]:
        """``input_ids``, ``attention_mask``, ``labels`` (-100 off the critical tokens) and
        ``token_weights`` (the mask), as :func:`sftkey.methods.keys.encode_example` returns them;
        None when the greedy response was wrong (CFT keeps only right ones)."""
        if not self.correct:
            return None
        mask, ids = self.critical_mask(rule), self.input_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)],
                "token_weights": [float(m) for m in mask]}


def _check_rule(rule: Any) -> str:
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    return rule


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
    """The results stored in a JSONL ``output`` of :func:`find_critical_tokens`."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [CriticalResult(**json.loads(line)) for line in f if line.strip()]


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


def find_critical_tokens(
    model,
    tokenizer,
    examples: Iterable[Mapping[str, Any]],
    *,
    checker: Optional[Checker] = None,
    ranks: Sequence[int] = (2, 3),
    rule: str = "any",
    positions: Optional[int] = None,
    start: int = 0,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    output: Optional[str] = None,
    progress: bool = True,
    decode: Optional[Callable[[list[int]], str]] = None,
) -> list[CriticalResult]:
    """CFT's counterfactual search over ``examples`` (mappings with ``"prompt"`` and
    ``"answer"``, or a reference ``"response"`` whose answer the default checker extracts).

    ``model``: a Hugging Face causal LM (``generate``); ``tokenizer``: its tokenizer (the
    prompt is encoded with its special tokens; ``pad_token_id`` or else ``eos_token_id``
    pads). ``checker(response_text, reference) -> bool``, default
    :class:`~sftkey.methods.answers.AnswerChecker` (``sftkey.methods.keys`` patterns, numbers compared as
    numbers). ``ranks``: the alternatives tried (2 = second most probable); ``rule``:
    ``"any"`` / ``"all"`` of them must fail. Position budget: only response positions
    ``>= start``, and at most ``positions`` of those per example, sampled with ``seed``
    (None: all). ``max_new_tokens``: the response budget. ``decode``: ids -> text for the
    checker (default ``tokenizer.decode(ids, skip_special_tokens=True)``).

    ``output``: a JSONL file, one :class:`CriticalResult` a line, appended after each
    example; examples whose index is already there are not searched again (resume with the
    same examples and settings; other ``ranks`` are refused, ``rule`` is re-applied).
    Returns the results of every example, in order.
    """
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
        if r.ranks != ranks:
            raise ValueError(f"output: {output} holds results for ranks {r.ranks}, not {ranks}; "
                             "resume with the settings it was written with, or write to a new file")
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
            prompt_ids = list(tokenizer(example["prompt"])["input_ids"])
            if not prompt_ids:
                raise ValueError(f"examples[{i}]: its 'prompt' encodes to no tokens (the first response "
                                 "token needs a position to be predicted from)")
            result = _search_one(model, i, prompt_ids, reference, checker, decode, ranks, rule,
                                 positions, start, random.Random(f"{seed}:{i}"), max_new_tokens, batch_size,
                                 pad_id, eos_id)
            done[i] = result
            if output:
                with open(output, "a", encoding="utf-8") as f:
                    f.write(json.dumps(asdict(result)) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rollouts=sum(r.rollouts for r in done.values()))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return [done[i] for i in range(len(examples))]


def _search_one(model, index, prompt_ids, reference, checker, decode, ranks, rule, positions, start, rng,
                max_new_tokens, batch_size, pad_id, eos_id) -> CriticalResult:
    """The search on one example: greedy decode, check, then the rollouts of every tried position."""
    response = greedy_continue(model, [prompt_ids], [max_new_tokens], pad_id=pad_id, eos_id=eos_id)[0]
    result = CriticalResult(index, prompt_ids, response, bool(checker(decode(response), reference)), ranks,
                            generated_tokens=len(response), rule=rule)
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
        if not checker(decode(prefix[len(prompt_ids):] + cont), reference):
            wrong[t].append(r)
    result.tried = tried
    result.wrong = [wrong[t] for t in tried]
    result.rollouts = len(jobs)
    result.generated_tokens += sum(len(c) for c in continued)
    return result
