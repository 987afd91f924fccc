"""CFT's critical-token search on a task whose critical tokens are known by construction.

The model is :class:`program_lm.HalfSum`'s: for the prompt ``"a+b="`` it writes
``"..{a+b}...<Answer>{(a+b)//2}</Answer>"`` and computes the answer from the sum as written,
so changing a digit of the sum changes the answer while the filler cannot. The search takes
each problem's training solution (``--solution greedy``: the model's greedy one), substitutes
the 2nd and 3rd most probable token at every position, continues greedily, and marks the
tokens where the substitutions make the answer wrong (all of them: the paper's rule; any of
them: the other). The script scores the found tokens against the construction (precision,
recall), for both rules, reports the cost in rollouts and the rollouts left without an
answer (a broken tag), resumes from its JSONL output, and trains one CFT step on the masks
(``methods.reduce`` with the mask as ``token_weights``; untried positions left untrained).

    python examples/critical_tokens.py                  # a few seconds
    python examples/critical_tokens.py --problems 200 --positions 6
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch

import sftkey
from sftkey import methods
from sftkey.methods.critical import find_critical_tokens
from sftkey.methods.data import TokenWeightCollator
from program_lm import HalfSum


def score(results, problems, task: HalfSum, rule: str) -> tuple[float, float]:
    """Precision and recall of the critical positions found, against the construction (on
    the positions tried)."""
    found = {(i, t) for i, r in enumerate(results) for t in r.critical(rule)}
    truth = {(i, t) for i, ((a, b), r) in enumerate(zip(problems, results))
             for t in task.critical(a, b, rule) if t in r.tried}
    hits = len(found & truth)
    return hits / max(len(found), 1), hits / max(len(truth), 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--positions", type=int, default=None, help="positions sampled per example (default: all)")
    parser.add_argument("--start", type=int, default=0, help="skip the first START response positions")
    parser.add_argument("--solution", choices=("reference", "greedy"), default="reference",
                        help="perturb the training solution (the paper) or the model's greedy one")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSONL of the results (default: a temporary file)")
    args = parser.parse_args(argv)

    task = HalfSum()
    rng = random.Random(args.seed)
    problems = [(rng.randint(0, 999), rng.randint(0, 999)) for _ in range(args.problems)]
    examples = [{**task.example(a, b), "response": task.response(a, b)} for a, b in problems]
    examples[0] = {**examples[0], "answer": examples[0]["answer"] + 1}   # a wrong reference: not searched
    output = args.output or os.path.join(tempfile.mkdtemp(), "critical.jsonl")

    model = task.model()
    t0 = time.perf_counter()
    search = dict(solution=args.solution, positions=args.positions, start=args.start, seed=args.seed,
                  max_new_tokens=24, batch_size=args.batch_size, output=output)
    half = find_critical_tokens(model, task.tokenizer, examples[:len(examples) // 2], progress=False, **search)
    results = find_critical_tokens(model, task.tokenizer, examples, progress=True, **search)  # resumes the first half
    elapsed = time.perf_counter() - t0
    assert results[:len(half)] == half

    kept = [(p, r) for p, r in zip(problems, results) if r.correct]
    summary = {"examples": len(results), "correct": len(kept),
               "rollouts": sum(r.rollouts for r in results),
               "unanswered": sum(r.unanswered for r in results),
               "tried": sum(len(r.tried) for r in results),
               "response_tokens": sum(len(r.response_ids) for _, r in kept),
               "generated_tokens": sum(r.generated_tokens for r in results), "seconds": elapsed}
    for rule in ("any", "all"):
        precision, recall = score([r for _, r in kept], [p for p, _ in kept], task, rule)
        share = sum(len(r.critical(rule)) for _, r in kept) / summary["response_tokens"]
        summary[rule] = {"precision": precision, "recall": recall, "critical_share": share}
        print(f"rule={rule}: precision {precision:.3f}, recall {recall:.3f}, "
              f"critical {share:.1%} of the response tokens")
    print(f"{summary['correct']}/{summary['examples']} {args.solution} solutions right; {summary['rollouts']} rollouts "
          f"({summary['rollouts'] / max(summary['tried'], 1):.1f} per tried position; {summary['unanswered']} without "
          f"an answer), {summary['generated_tokens']} tokens generated in {elapsed:.2f} s; results in {output}")

    # one CFT step on the masks: the features carry labels and token weights on the critical tokens
    features = [r.features(untried=0) for _, r in kept]
    batch = TokenWeightCollator.from_tokenizer(task.tokenizer)(features)
    torch.manual_seed(args.seed)
    emb = torch.nn.Embedding(len(task.TOKENS), 16)
    head = torch.nn.Linear(16, len(task.TOKENS), bias=False)
    st = sftkey.logit_stats(emb(batch["input_ids"])[:, :-1], head.weight, batch["labels"][:, 1:])
    loss = methods.reduce(methods.sft(st), st, token_weights=batch["token_weights"][:, 1:])
    loss.backward()
    summary["cft_loss"] = loss.item()
    print(f"CFT loss on the critical tokens of the kept examples: {loss.item():.4f}")
    return summary


if __name__ == "__main__":
    main()
