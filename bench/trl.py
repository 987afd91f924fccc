"""``python -m bench.trl``: TRL's ``SFTTrainer`` with its own fused head (``loss_type="nll"``, the
former ``chunked_nll``) against ``sftkey.integrations.trl.FusedSFTTrainer``, on a tiny Llama
with a large vocabulary: the losses of the same batches, the peak memory of ``train()`` and
the time of a training step, side by side, in one run.

Per vocabulary size and trainer, a fresh process builds the model (``--layers`` Llama layers
of width ``--hidden``, the same seed), a pre-tokenized dataset of random token sequences and
the trainer, and runs ``train()`` for ``--steps`` steps at learning rate 0 (every step sees
the same weights, so each step's loss compares across trainers; the optimizer still runs)
with ``--threads`` torch threads. Reported: each step's loss and the largest relative
difference, the peak RSS during ``train()`` above what was allocated before it
(:func:`bench.measure.peak_memory`), and the median step time after the first step.
Writes JSON and Markdown under bench/results/ (named by date and CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from . import ROOT
from .measure import peak_memory
from .peers import package_version
from .report import cpu_info, device_name, device_slug, git_commit

TRAINERS = ("trl-chunked-nll", "sftkey")
MIB = 1 << 20


def worker(trainer_name: str, vocab: int, args: argparse.Namespace) -> dict:
    """One trainer's run (in its own process): losses, peak memory, step times."""
    import datasets
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=args.seq, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, vocab, (args.seq,), generator=g).tolist()}
            for _ in range(args.batch * args.steps)]
    tokenizer = _tokenizer()
    sft_config = trl.SFTConfig(tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch,
                               learning_rate=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                               bf16=False, disable_tqdm=True, max_length=args.seq, seed=0, dataloader_num_workers=0)
    kwargs = dict(model=model, args=sft_config, train_dataset=datasets.Dataset.from_list(rows),
                  processing_class=tokenizer)
    if trainer_name == "sftkey":
        from sftkey.integrations.trl import FusedSFTTrainer

        trainer = FusedSFTTrainer(**kwargs)
    else:
        trainer = trl.SFTTrainer(**kwargs)
    times = _step_times()
    trainer.add_callback(times)
    _, peak = peak_memory(torch.device("cpu"), trainer.train)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"trainer": trainer_name, "vocab": vocab, "losses": losses, "peak_mib": peak / MIB,
            "step_s": statistics.median(times.seconds[1:]), "step_times": times.seconds}


def _tokenizer():
    """A word-level tokenizer with a pad and an EOS token: TRL needs one, the data is tokenized already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _step_times():
    """A TrainerCallback that times each optimizer step (forward, backward, update) into ``.seconds``."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], None

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    return StepTimes()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("TRAINER", "VOCAB"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return 0
    torch.set_num_threads(args.threads)
    meta = {"device": device_name(torch.device("cpu")), "cpu": cpu_info(), "commit": git_commit(),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": {p: package_version(p) for p in ("torch", "transformers", "trl", "accelerate", "datasets")},
            "settings": {k: getattr(args, k) for k in ("hidden", "layers", "seq", "batch", "steps", "threads")},
            "load_average_start": os.getloadavg()[0]}  # other work on the machine shows here
    print(f"bench.trl: {meta['device']}\nversions: {meta['versions']}\nsettings: {meta['settings']}\n"
          f"load average: {meta['load_average_start']:.2f}")
    results = []
    for vocab in args.vocab:
        for name in TRAINERS:
            cmd = [sys.executable, "-m", "bench.trl", "--worker", name, str(vocab),
                   *[f"--{k}={v}" for k, v in meta["settings"].items()]]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:])
                return 1
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    meta["load_average_end"] = os.getloadavg()[0]
    rows = []
    for vocab in args.vocab:
        theirs, ours = (next(r for r in results if r["vocab"] == vocab and r["trainer"] == t) for t in TRAINERS)
        rel = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], theirs["losses"]))
        rows.append({"vocab": vocab, "max_rel_loss_diff": rel, "loss_trl": theirs["losses"][0],
                     "loss_sftkey": ours["losses"][0], "peak_mib_trl": theirs["peak_mib"],
                     "peak_mib_sftkey": ours["peak_mib"], "step_s_trl": theirs["step_s"],
                     "step_s_sftkey": ours["step_s"]})
    table = ["| V | first loss, TRL | first loss, sftkey | max rel. loss diff (all steps) | peak MiB, TRL | "
             "peak MiB, sftkey | step s, TRL | step s, sftkey |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['vocab']} | {r['loss_trl']:.7f} | {r['loss_sftkey']:.7f} | {r['max_rel_loss_diff']:.1e} | "
              f"{r['peak_mib_trl']:.0f} | {r['peak_mib_sftkey']:.0f} | {r['step_s_trl']:.3f} | "
              f"{r['step_s_sftkey']:.3f} |" for r in rows]
    print("\n".join(table) + f"\nload average at the end: {meta['load_average_end']:.2f}")
    name = f"{datetime.now():%Y%m%d-%H%M%S}-trl-{device_slug(torch.device('cpu'))}"
    out = ROOT / "bench" / "results"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=1))
    (out / f"{name}.md").write_text(f"# TRL's SFTTrainer (its chunked NLL) vs FusedSFTTrainer\n\n{meta['device']}; "
                                    f"versions {meta['versions']}; commit {meta['commit']}; {meta['date']}; load average "
                                    f"{meta['load_average_start']:.2f} at the start, {meta['load_average_end']:.2f} "
                                    "at the end\n\n"
                                    f"Settings: {meta['settings']}\n\n" + "\n".join(table) + "\n")
    print(f"wrote bench/results/{name}.json, .md")
    return 0 if all(r["max_rel_loss_diff"] <= 1e-6 for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
