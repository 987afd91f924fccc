"""SFTKey vs plain SFT on a task with SFTKey's failure mode: a long chain, a short answer that is not a copy.

Each prompt lists ten labelled digits; the chain of thought works out each digit's
intermediate value (``3 d + 1 mod 10``), one step per digit; the answer is ``(first
intermediate + last intermediate) mod 10``, written ``#### d`` after the chain. The chain is
50 response tokens and the answer one digit, so the answer is about 2% of the stage-1 loss,
and it is a function of two intermediate values, not a copy of the chain's last number.

For every seed: one stage 1 on all response tokens, then, from that model, three stage-2
runs with the same steps, learning rate, schedule, batches and data order, differing only
in the token weights: plain SFT (every response token), SFTKey key-only (the ``#### d``
line and EOS), and SFTKey's blend (those, plus the chain at ``--cot-weight``). Accuracy is
measured by greedy decoding on held-out problems; an answer counts only when the completion
is well-formed (``... #### d`` then EOS); the held-out answer loss is the teacher-forced loss
on the answer digit. All losses go through ``SFTKeyTrainer``, sftkey's
fused loss (no logits).

    python examples/sftkey_multistep.py                      # 3 seeds, one process each
    python examples/sftkey_multistep.py --seeds 0 --stage1-steps 40 --stage2-steps 10 --eval 20
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers import TrainingArguments

from sftkey.methods import keys
from sftkey.methods.data import TokenWeightCollator
from sftkey.methods.trainer import SFTKeyTrainer, Stage
from sftkey_arithmetic import build_model, build_tokenizer, key_loss

MARKER = "####"
LABELS = "abcdefghijklmnopqrstuvwxyz"
KEY_OPTIONS = {"patterns": "gsm8k", "include_tags": True, "include_eos": True}
"""The key tokens: the whole ``#### d`` line and the EOS after it, so stage 2 keeps the format."""
DIGIT_OPTIONS = {"patterns": "gsm8k", "include_eos": False}
"""The answer digit alone, for the held-out answer loss (chance: ln 10 = 2.303)."""


def answer_of(values: list[int]) -> int:
    """The answer from the chain's intermediate values: ``(first + last) mod 10``."""
    return (values[0] + values[-1]) % 10


def step_rule(digit: int) -> int:
    """One chain step: the intermediate value of a prompt digit, ``3 d + 1 mod 10`` (a permutation)."""
    return (3 * digit + 1) % 10


def make_problem(rng: random.Random, min_steps: int, max_steps: int) -> dict:
    """One problem: ``prompt``, ``response`` (chain then ``#### d``), ``chain``, ``values``, ``answer``.

    The prompt lists labelled digits (``Q : a 6 b 3 ...``); each chain step repeats a label and
    its digit and writes the digit's intermediate value (``a 6 = 9 , b 3 = 0 , ...``), so a step
    finds its digit by the label (an induction-head copy) and applies :func:`step_rule`."""
    digits = [rng.randint(0, 9) for _ in range(rng.randint(min_steps, max_steps))]
    values = [step_rule(d) for d in digits]
    chain = " ".join(f"{label} {d} = {v} ," for label, d, v in zip(LABELS, digits, values))
    answer = answer_of(values)
    return {
        "prompt": f"Q : {' '.join(f'{label} {d}' for label, d in zip(LABELS, digits))}\n",
        "response": f"{chain}\n{MARKER} {answer}",
        "chain": chain,
        "values": values,
        "answer": answer,
    }


def make_problems(n: int, seed: int, min_steps: int = 10, max_steps: int = 10) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, min_steps, max_steps) for _ in range(n)]


def token_shares(features: list[dict], key_features: list[dict]) -> dict:
    """Share of the stage-1 trained tokens that are key tokens, and that are the answer digit."""
    trained = sum(w > 0 for f in features for w in f["token_weights"])
    key = sum(w > 0 for f in key_features for w in f["token_weights"])
    return {"key": key / trained, "answer_digit": len(features) / trained}


def grade(tokens: list[str], eos: str, problem: dict) -> dict:
    """Whether a completion (its tokens) is well-formed (``chain #### d`` then EOS), its answer
    right (only when well-formed) and its chain exactly the true one."""
    body = tokens[:tokens.index(eos)] if eos in tokens else None
    formed = (body is not None and len(body) >= 2 and body[-2] == MARKER and body[-1].isdigit()
              and body.count(MARKER) == 1)
    return {"format": formed,
            "answer": formed and int(body[-1]) == problem["answer"],
            "chain": formed and body[:-2] == problem["chain"].split()}


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], batch_size: int = 100) -> dict:
    """Greedy decoding on ``problems``: format rate, answer accuracy (well-formed and right),
    chain accuracy, and answer accuracy among the completions whose chain is right (None
    when no chain is right)."""
    model.eval()
    longest = max(len(tokenizer(p["response"])["input_ids"]) for p in problems)
    graded = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        batch = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=longest + 4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for p, ids in zip(chunk, out[:, batch["input_ids"].shape[1]:]):
            graded.append(grade(tokenizer.convert_ids_to_tokens(ids), tokenizer.eos_token, p))
    chains = [g for g in graded if g["chain"]]
    return {"format_rate": sum(g["format"] for g in graded) / len(graded),
            "answer_accuracy": sum(g["answer"] for g in graded) / len(graded),
            "chain_accuracy": len(chains) / len(graded),
            "answer_given_chain": sum(g["answer"] for g in chains) / len(chains) if chains else None}


def run_seed(args, seed: int) -> dict:
    """Stage 1, then each stage-2 setting from the same stage-1 model; results per setting."""
    torch.set_num_threads(args.threads)
    problems = make_problems(args.train + args.eval, seed, args.min_steps, args.max_steps)
    train, held_out = problems[:args.train], problems[args.train:]
    tokenizer = build_tokenizer([p["prompt"] + p["response"] for p in problems])
    examples = [{"prompt": p["prompt"], "response": p["response"]} for p in train]
    all_tokens, _ = keys.build_features(tokenizer, examples, stage=1)
    stage2 = {"SFT": all_tokens}
    for label, cot in (("SFTKey key-only", 0.0), (f"SFTKey blend {args.cot_weight:g}", args.cot_weight)):
        stage2[label], report = keys.build_features(tokenizer, examples, stage=2, cot_weight=cot, **KEY_OPTIONS)
        if report.kept != len(examples):
            raise RuntimeError(f"{label}: {report.dropped} examples without a key span")
    shares = token_shares(all_tokens, stage2["SFTKey key-only"])
    print(f"seed {seed}: {len(train)} training problems, {len(held_out)} held out, vocabulary {len(tokenizer)}; "
          f"key tokens {shares['key']:.1%} of the stage-1 loss tokens, the answer digit {shares['answer_digit']:.1%}",
          flush=True)

    collator = TokenWeightCollator.from_tokenizer(tokenizer, padding_side="right")
    answer_digits, _ = keys.build_features(tokenizer, [{"prompt": p["prompt"], "response": p["response"]}
                                                       for p in held_out], stage=2, **DIGIT_OPTIONS)
    training = TrainingArguments(
        tempfile.mkdtemp(prefix="sftkey_multistep_"), per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, logging_steps=50, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=seed, data_seed=seed)

    def train_and_evaluate(model, stage: Stage) -> dict:
        start = time.time()
        SFTKeyTrainer(model=model, args=training, data_collator=collator).train_stages(stage)
        seconds = time.time() - start
        result = {**evaluate(model, tokenizer, held_out), "answer_loss": key_loss(model, answer_digits, collator)}
        print(f"  seed {seed}, {stage.name}: {stage.max_steps} steps in {seconds:.0f} s; " +
              ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in result.items()), flush=True)
        return result

    model = build_model(tokenizer, args.hidden, args.layers, seed)
    results = {"stage 1": train_and_evaluate(
        model, Stage(all_tokens, max_steps=args.stage1_steps, learning_rate=args.stage1_lr, name="stage 1"))}
    for label, data in stage2.items():
        results[label] = train_and_evaluate(
            copy.deepcopy(model), Stage(data, max_steps=args.stage2_steps, learning_rate=args.stage2_lr, name=label))
    return {"shares": shares, "results": results}


def summarize(runs: dict) -> dict:
    """Per setting and metric: the mean, the sample standard deviation, the minimum and maximum
    over the seeds that have a value (None when none has; std 0 for one value)."""
    settings = next(iter(runs.values()))["results"]
    summary = {}
    for setting, metrics in settings.items():
        summary[setting] = {}
        for metric in metrics:
            values = [v for run in runs.values() if (v := run["results"][setting][metric]) is not None]
            summary[setting][metric] = {"mean": statistics.fmean(values),
                                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                        "min": min(values), "max": max(values)} if values else None
    return summary


def table(summary: dict) -> str:
    """The summary as a Markdown table: mean ± standard deviation per setting and metric."""
    lines = ["| after | format rate | answer accuracy | chain accuracy | answer accuracy, chain right | "
             "held-out answer loss |", "|---|---|---|---|---|---|"]
    for setting, metrics in summary.items():
        cells = ("-" if m is None else f"{m['mean']:.3f} ± {m['std']:.3f}" for m in metrics.values())
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="each seed draws its own data, model initialisation and data order")
    parser.add_argument("--train", type=int, default=6000, help="training problems")
    parser.add_argument("--eval", type=int, default=300, help="held-out problems, decoded greedily")
    parser.add_argument("--min-steps", type=int, default=10, help="fewest chain steps")
    parser.add_argument("--max-steps", type=int, default=10, help="most chain steps")
    parser.add_argument("--stage1-steps", type=int, default=400)
    parser.add_argument("--stage2-steps", type=int, default=150)
    parser.add_argument("--stage1-lr", type=float, default=3e-3)
    parser.add_argument("--stage2-lr", type=float, default=1e-3)
    parser.add_argument("--cot-weight", type=float, default=0.1, help="chain weight of the SFTKey blend")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--json", help="write the per-seed results and the summary to this file")
    parser.add_argument("--jobs", type=int, help="seeds run at once, one process each (default: all of them)")
    args = parser.parse_args(argv)
    if not 1 <= args.min_steps <= args.max_steps <= len(LABELS):
        parser.error(f"--min-steps, --max-steps: expected 1 <= min <= max <= {len(LABELS)}, "
                     f"got {args.min_steps}, {args.max_steps}")

    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {args.jobs}")

    start = time.time()
    # each seed seeds every generator it uses, so its result is the same alone or among others
    with ProcessPoolExecutor(args.jobs or len(args.seeds), mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = dict(zip(args.seeds, pool.map(run_seed, [args] * len(args.seeds), args.seeds)))
    out = {"config": vars(args), "runs": runs, "summary": summarize(runs), "seconds": time.time() - start}
    print(f"\n{len(args.seeds)} seeds in {out['seconds']:.0f} s; mean ± standard deviation over seeds")
    print(table(out["summary"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
