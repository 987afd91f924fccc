"""Does a long chain of thought with irreducible loss dilute the answer? SFT vs SFTKey's stage 2.

The task: the prompt gives two digits and a start word (``Q : 3 7 hmm``); the chain of thought
is ``--chain-length`` filler words, then restates the digits (``= 3 7``); the answer, on a
``#### d`` line, is ``table[a][b]`` for a 10 x 10 table of digits drawn per seed (100 facts
to learn). Two conditions, which share every seed's table, operands, initialisation and data
order and differ only in the fillers:

* ``random``: each filler drawn uniformly from 16 words, so the chain carries
  ``chain_length x ln 16`` nats of loss that no model can remove (110.9 at 40 fillers),
  against ln 10 = 2.3 for the answer;
* ``deterministic`` (the negative control): the fillers continue a fixed cycle of the 16
  words from the prompt's start word, so the chain's loss can go to 0; equal length.

Per seed and condition: stage 1 trains every response token at a constant learning rate,
decodes the validation split every ``--stage1-check`` steps and stops at the first check
whose accuracy reaches ``--stage1-target`` (so every seed starts stage 2 part-way up its
learning curve, whenever it gets there); then, from that model, each arm runs stage 2 for the
same steps on the same batches (cosine schedule, fresh AdamW), at every learning rate of
``--lrs``:

* ``SFT``: every response token (``keys.build_features(stage=1)``);
* ``key-only``: the ``#### d`` line and EOS (``stage=2, patterns="gsm8k", include_tags=True,
  include_eos=True``), the chain as context;
* ``blend``: those at weight 1 and the chain at ``--cot-weight``.

Each arm keeps the learning rate with the best answer accuracy on the seed's validation
split (the first such rate in ``--lrs`` on a tie); its accuracy on the test split, which
chose nothing, is the result. Accuracy is format-gated greedy accuracy: the greedy completion
must end in one ``#### d`` line and EOS, and ``d`` must be right. The pre-registered
contrasts, per condition, are blend - SFT and key-only - SFT on the test accuracy, paired by
seed: the mean, a bootstrap 95% CI over seeds and the count of seeds above / below / level;
and each contrast's difference between the conditions, paired by seed. Dilution predicts blend - SFT > 0 with random fillers and about 0 in the control. Every loss
is ``SFTKeyTrainer``'s fused loss (no logits).

    PYTHONPATH=. python examples/sftkey_dilution.py --jobs 2 --json examples/sftkey_dilution.json
    PYTHONPATH=. python examples/sftkey_dilution.py --seeds 0 --stage1-max-steps 100 --stage2-steps 20 \
        --lrs 1e-3 --jobs 1    # a minute
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from sftkey.methods import keys
from sftkey.methods.data import TokenWeightCollator
from sftkey.methods.trainer import SFTKeyTrainer
from sftkey_arithmetic import build_model, build_tokenizer, key_loss

MARKER = "####"
FILLERS = "so well hmm ok now then right yes wait thus next see sure fine good also".split()
VOCABULARY = " ".join(["Q", ":", "=", MARKER, *"0123456789", *FILLERS])
CONDITIONS = ("random", "deterministic")
ARMS = ("SFT", "key-only", "blend")
CONTRASTS = ("blend", "key-only")
"""Each contrast is that arm minus SFT."""
KEY = {"stage": 2, "patterns": "gsm8k", "include_tags": True, "include_eos": True}
"""SFTKey's key tokens: the whole ``#### d`` line and the EOS after it (explicit, not the library's defaults)."""
DIGIT = {"stage": 2, "patterns": "gsm8k", "include_tags": False, "include_eos": False}
"""The answer digit alone, for the held-out answer loss (chance: ln 10 = 2.303)."""


def make_problems(n: int, seed: int, condition: str, chain_length: int = 40) -> list[dict]:
    """``n`` problems of ``seed``: dicts with ``prompt``, ``response``, ``chain``, ``operands``, ``answer``.

    The table, the operands and the start words come from one stream and the random fillers
    from another, so both conditions of a seed have the same table, operands and start words."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition: expected one of {CONDITIONS}, got {condition!r}")
    facts, fill = random.Random(seed), random.Random(f"{seed} fillers")
    table = [[facts.randrange(10) for _ in range(10)] for _ in range(10)]
    problems = []
    for _ in range(n):
        a, b, start = facts.randrange(10), facts.randrange(10), facts.randrange(len(FILLERS))
        if condition == "random":
            words = [fill.choice(FILLERS) for _ in range(chain_length)]
        else:
            words = [FILLERS[(start + 1 + i) % len(FILLERS)] for i in range(chain_length)]
        chain = f"{' '.join(words)} = {a} {b}"
        problems.append({"prompt": f"Q : {a} {b} {FILLERS[start]}\n", "response": f"{chain}\n{MARKER} {table[a][b]}",
                         "chain": chain, "operands": (a, b), "answer": table[a][b]})
    return problems


def grade(tokens: list[str], eos: str, problem: dict) -> dict:
    """A completion's tokens: well-formed (one ``#### d`` line, then EOS), answer right (only
    when well-formed), chain right (well-formed, as many fillers as the true chain, then
    ``= a b`` with the prompt's digits)."""
    body = tokens[:tokens.index(eos)] if eos in tokens else None
    formed = (body is not None and len(body) >= 2 and body[-2] == MARKER and body[-1].isdigit()
              and body.count(MARKER) == 1)
    true_chain = problem["chain"].split()
    chain = formed and len(body) == len(true_chain) + 2 and body[-5:-2] == true_chain[-3:] and all(
        w in FILLERS for w in body[:-5])
    return {"format": formed, "answer": formed and int(body[-1]) == problem["answer"], "chain": chain}


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], collator, batch_size: int = 1000) -> dict:
    """Greedy decoding of ``problems``: format rate, answer accuracy (format-gated), chain
    accuracy; and the teacher-forced loss on the answer digit."""
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
    digits, _ = keys.build_features(tokenizer, [{"prompt": p["prompt"], "response": p["response"]}
                                                for p in problems], **DIGIT)
    return {"format_rate": statistics.fmean(g["format"] for g in graded),
            "answer_accuracy": statistics.fmean(g["answer"] for g in graded),
            "chain_accuracy": statistics.fmean(g["chain"] for g in graded),
            "answer_loss": key_loss(model, digits, collator)}


def arm_features(tokenizer, problems: list[dict], cot_weight: float) -> dict[str, list[dict]]:
    """The stage-2 features of each arm; the same sequences in the same order in every arm."""
    examples = [{"prompt": p["prompt"], "response": p["response"]} for p in problems]
    options = {"SFT": {"stage": 1}, "key-only": KEY, "blend": {**KEY, "cot_weight": cot_weight}}
    features = {}
    for arm in ARMS:
        features[arm], report = keys.build_features(tokenizer, examples, **options[arm])
        if report.kept != len(examples):
            raise RuntimeError(f"{arm}: {report.dropped} of {len(examples)} examples without a key span")
    return features


class StopAtAccuracy(TrainerCallback):
    """Every ``every`` steps, ``measure()`` the model (a dict with ``answer_accuracy``) and stop
    training at the first measure that reaches ``target``; ``checks`` keeps each step and measure."""

    def __init__(self, measure, every: int, target: float):
        self.measure, self.every, self.target, self.checks = measure, every, target, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.checks.append((state.global_step, self.measure()))
            if self.checks[-1][1]["answer_accuracy"] >= self.target:
                control.should_training_stop = True


def run_task(args, seed: int, condition: str) -> dict:
    """One seed in one condition: stage 1 up to the target accuracy, then every arm at every
    learning rate from that model."""
    start, cpu = time.time(), time.process_time()
    torch.set_num_threads(args.threads)
    problems = make_problems(args.train + args.val + args.test, seed, condition, args.chain_length)
    train, val, test = (problems[:args.train], problems[args.train:args.train + args.val],
                        problems[args.train + args.val:])
    tokenizer = build_tokenizer([VOCABULARY])
    features = arm_features(tokenizer, train, args.cot_weight)
    collator = TokenWeightCollator.from_tokenizer(tokenizer, padding_side="right")

    def fit(model, data: list[dict], steps: int, lr: float, schedule: str = "cosine", callbacks=()):
        """Train ``model`` in place with a fresh AdamW: ``steps`` steps (or until a callback stops
        it) at peak ``lr`` on ``schedule`` after a 5% warm-up."""
        with tempfile.TemporaryDirectory(prefix="sftkey_dilution_") as out:
            training = TrainingArguments(
                out, per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=lr,
                lr_scheduler_type=schedule, warmup_steps=0.05, weight_decay=0.0, logging_steps=steps,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=seed, data_seed=seed)
            trainer = SFTKeyTrainer(model=model, args=training, train_dataset=data, data_collator=collator,
                                    callbacks=list(callbacks))
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        return model

    gc.freeze()  # the features: accelerate's gc.collect() after every train() would walk them each time
    try:
        model = build_model(tokenizer, args.hidden, args.layers, seed)

        def measure() -> dict:
            metrics = evaluate(model, tokenizer, val, collator)
            model.train()
            return metrics

        stop = StopAtAccuracy(measure, args.stage1_check, args.stage1_target)
        fit(model, features["SFT"], args.stage1_max_steps, args.stage1_lr, "constant_with_warmup", [stop])
        steps, last = stop.checks[-1]  # the last step is a check: --stage1-max-steps is a multiple
        result = {"seed": seed, "condition": condition, "stage 1": {
            "steps": steps, "reached": last["answer_accuracy"] >= args.stage1_target,
            "checks": [[step, m["answer_accuracy"]] for step, m in stop.checks],
            "val": last, "test": evaluate(model, tokenizer, test, collator)}}
        for arm in ARMS:
            best, runs = None, []
            for lr in args.lrs:
                tuned = fit(copy.deepcopy(model), features[arm], args.stage2_steps, lr)
                runs.append({"lr": lr, "val": evaluate(tuned, tokenizer, val, collator)})
                if best is None or runs[-1]["val"]["answer_accuracy"] > best[0]["val"]["answer_accuracy"]:
                    best = runs[-1], tuned  # the first of equal ones
            # the test split is decoded once per arm, for the model its validation split chose
            result[arm] = {"lr": best[0]["lr"], "test": evaluate(best[1], tokenizer, test, collator), "by_lr": runs}
    finally:
        gc.unfreeze()
    result["seconds"], result["cpu_seconds"] = time.time() - start, time.process_time() - cpu
    return result


def bootstrap_ci(values: list[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def paired(seeds: list[int], differences: list[float]) -> dict:
    """Differences paired by seed: their mean, bootstrap 95% CI, and the seeds above, below and level."""
    return {"seeds": seeds, "differences": differences, "mean": statistics.fmean(differences),
            "ci95": bootstrap_ci(differences), "above": sum(d > 0 for d in differences),
            "below": sum(d < 0 for d in differences), "level": sum(d == 0 for d in differences)}


BETWEEN = "random - deterministic"
"""The summary's entry for each contrast's difference between the conditions, paired by seed."""


def summarize(runs: list[dict]) -> dict:
    """Per condition (in the order of :data:`CONDITIONS`, those present), over its seeds: each
    setting's test metrics (mean, sample std, min, max) and chosen learning rates, and each
    contrast (arm - SFT in test answer accuracy, :func:`paired` by seed); with both conditions,
    also :data:`BETWEEN`: each contrast's random minus deterministic value, paired by seed
    (both conditions of a seed share its table, operands and initialisation)."""
    summary, by_seed = {}, {}
    for condition in CONDITIONS:
        rows = sorted((r for r in runs if r["condition"] == condition), key=lambda r: r["seed"])
        if not rows:
            continue
        settings = {}
        for setting in ("stage 1", *ARMS):
            tests = [r[setting]["test"] for r in rows]
            settings[setting] = {metric: spread([t[metric] for t in tests]) for metric in tests[0]}
            settings[setting]["lr" if setting in ARMS else "steps"] = [
                r[setting]["lr" if setting in ARMS else "steps"] for r in rows]
        contrasts = {}
        for arm in CONTRASTS:
            diffs = {r["seed"]: r[arm]["test"]["answer_accuracy"] - r["SFT"]["test"]["answer_accuracy"] for r in rows}
            contrasts[f"{arm} - SFT"] = paired(list(diffs), list(diffs.values()))
            by_seed[condition, arm] = diffs
        summary[condition] = {"settings": settings, "contrasts": contrasts}
    if len(summary) == len(CONDITIONS):
        summary[BETWEEN] = {"contrasts": {}}
        for arm in CONTRASTS:
            random_, fixed = by_seed["random", arm], by_seed["deterministic", arm]
            seeds = [seed for seed in random_ if seed in fixed]
            summary[BETWEEN]["contrasts"][f"{arm} - SFT"] = paired(seeds, [random_[s] - fixed[s] for s in seeds])
    return summary


def tables(summary: dict) -> str:
    """The summary as Markdown: test metrics per condition and setting, then the contrasts."""
    lines = ["| condition | after | answer accuracy, mean ± std [min, max] | format rate | chain accuracy | "
             "answer loss | stage-1 steps [min, max]; chosen lr (seeds) |", "|---|---|---|---|---|---|---|"]
    for condition, s in summary.items():
        for setting, m in s.get("settings", {}).items():
            a = m["answer_accuracy"]
            lrs = (", ".join(f"{lr:g} ({m['lr'].count(lr)})" for lr in sorted(set(m["lr"]))) if "lr" in m
                   else f"{statistics.fmean(m['steps']):.0f} [{min(m['steps'])}, {max(m['steps'])}]")
            lines.append(f"| {condition} | {setting} | {a['mean']:.3f} ± {a['std']:.3f} [{a['min']:.3f}, "
                         f"{a['max']:.3f}] | {m['format_rate']['mean']:.3f} | {m['chain_accuracy']['mean']:.3f} | "
                         f"{m['answer_loss']['mean']:.3f} | {lrs} |")
    lines += ["", "| condition | contrast | mean | bootstrap 95% CI | seeds above / below / level |",
              "|---|---|---|---|---|"]
    for condition, s in summary.items():
        for name, c in s["contrasts"].items():
            lines.append(f"| {condition} | {name} | {c['mean']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
                         f"{c['above']} / {c['below']} / {c['level']} |")
    return "\n".join(lines)


def per_seed_table(runs: list[dict]) -> str:
    """Test answer accuracy per seed: stage 1 (with its steps) and each arm, per condition."""
    conditions = [c for c in CONDITIONS if any(r["condition"] == c for r in runs)]
    by = {(r["seed"], r["condition"]): r for r in runs}
    head = " | ".join(f"{c}: {s}" for c in conditions for s in ("stage 1", *ARMS))
    lines = [f"| seed | {head} |", "|---|" + "---|" * (len(conditions) * (1 + len(ARMS)))]
    for seed in sorted({r["seed"] for r in runs}):
        cells = [f"{by[seed, c][s]['test']['answer_accuracy']:.3f}" + (
                 f" ({by[seed, c][s]['steps']})" if s == "stage 1" else "") if (seed, c) in by else "-"
                 for c in conditions for s in ("stage 1", *ARMS)]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)),
                        help="each seed draws its own table, problems, initialisation and data order")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--train", type=int, default=8000, help="training problems")
    parser.add_argument("--val", type=int, default=500, help="validation problems, which choose each arm's lr")
    parser.add_argument("--test", type=int, default=1000, help="held-out test problems, decoded greedily")
    parser.add_argument("--chain-length", type=int, default=40, help="filler words in the chain")
    parser.add_argument("--stage1-target", type=float, default=0.3,
                        help="stage 1 stops at the first check whose validation accuracy reaches this")
    parser.add_argument("--stage1-check", type=int, default=50, help="stage-1 steps between checks")
    parser.add_argument("--stage1-max-steps", type=int, default=3000,
                        help="stage 1 stops here if it has not reached the target (a multiple of --stage1-check)")
    parser.add_argument("--stage1-lr", type=float, default=3e-3, help="stage-1 learning rate (constant after warm-up)")
    parser.add_argument("--stage2-steps", type=int, default=100, help="stage-2 steps of every arm")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3],
                        help="stage-2 learning rates tried by every arm")
    parser.add_argument("--cot-weight", type=float, default=0.1, help="chain weight of the blend")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="(seed, condition) tasks run at once, one process each (1: in this process)")
    parser.add_argument("--json", help="write the configuration, every run and the summary to this file")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {args.jobs}")
    if args.chain_length < 1:
        parser.error(f"--chain-length: expected >= 1, got {args.chain_length}")
    if args.stage1_check < 1 or args.stage1_max_steps % args.stage1_check:
        parser.error(f"--stage1-max-steps, --stage1-check: expected a multiple of a check >= 1, "
                     f"got {args.stage1_max_steps}, {args.stage1_check}")
    return args


def main(argv=None) -> dict:
    """Run every (seed, condition) task, print the tables, write ``--json``; return what it writes."""
    args = parse_args(argv)
    start, load = time.time(), os.getloadavg()
    tasks = [(seed, condition) for seed in args.seeds for condition in args.conditions]

    def progress(done: int, r: dict) -> dict:
        print(f"[{done}/{len(tasks)}, {time.time() - start:.0f} s] seed {r['seed']} {r['condition']}: "
              f"{r['seconds']:.0f} s; test accuracy stage 1 {r['stage 1']['test']['answer_accuracy']:.3f}, " +
              ", ".join(f"{arm} {r[arm]['test']['answer_accuracy']:.3f} (lr {r[arm]['lr']:g})" for arm in ARMS),
              flush=True)
        return r

    # every task seeds all it uses, so its result is the same alone, after others, or in another process
    if args.jobs == 1:
        runs = [progress(i, run_task(args, *task)) for i, task in enumerate(tasks, 1)]
    else:
        with ProcessPoolExecutor(min(args.jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_task, args, *task) for task in tasks]
            for done, future in enumerate(as_completed(futures), 1):
                progress(done, future.result())
        runs = [f.result() for f in futures]
    out = {"config": vars(args), "chain_nats": {"random": args.chain_length * math.log(len(FILLERS)),
                                                 "deterministic": 0.0},
           "runs": runs, "summary": summarize(runs), "seconds": time.time() - start,
           "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
           "load_average": {"start": load, "end": os.getloadavg()}}
    print(f"\n{len(tasks)} tasks in {out['seconds']:.0f} s with {min(args.jobs, len(tasks))} jobs, "
          f"{out['cpu_seconds']:.0f} s of CPU time in the tasks (load average {load[0]:.1f} at the start, "
          f"{out['load_average']['end'][0]:.1f} at the end)\n")
    print(tables(out["summary"]) + "\n\nTest answer accuracy per seed:\n\n" + per_seed_table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
