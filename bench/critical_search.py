"""``python -m bench.critical_search``: tokens per second of CFT's critical-token search.

A tiny Llama from a config (random weights, seeded), prompts from :class:`examples.program_lm.HalfSum`'s
tokenizer, a checker that calls every response right (so every position is tried: the
search's whole cost), ``max_new_tokens`` per response. For each batch size it reports the
rollouts, the generated tokens (greedy decodes included), the wall time and the process's
CPU time; tokens per second = generated tokens / wall time, and per CPU second. On a shared
machine the wall time measures the contention as much as the search; the CPU time less so
(it still includes the threads' spinning).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftkey.methods.critical import find_critical_tokens
from examples.program_lm import HalfSum

from .report import device_name


def tiny_llama(vocab_size: int, hidden: int, layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.critical_search", description=__doc__.split("\n")[0])
    p.add_argument("--problems", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    task = HalfSum()
    model = tiny_llama(len(task.TOKENS), args.hidden, args.layers)
    examples = [{"prompt": task.prompt(17 * i + 3, 5 * i + 11), "answer": ""} for i in range(args.problems)]
    print(f"# CFT search on a tiny Llama (hidden {args.hidden}, {args.layers} layers, vocab {len(task.TOKENS)}), "
          f"{args.problems} problems, max_new_tokens {args.max_new_tokens}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"# {device_name(torch.device('cpu'))}")
    print("| batch size | rollouts | generated tokens | wall s | tokens/s | rollouts/s | CPU s | tokens/CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for bs in args.batch_sizes:
        t0, c0 = time.perf_counter(), time.process_time()
        results = find_critical_tokens(model, task.tokenizer, examples, checker=lambda text, ref: True,
                                       max_new_tokens=args.max_new_tokens, batch_size=bs, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        rollouts = sum(r.rollouts for r in results)
        tokens = sum(r.generated_tokens for r in results)
        rows.append({"batch_size": bs, "rollouts": rollouts, "generated_tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds, "rollouts_per_s": rollouts / seconds, "cpu_seconds": cpu,
                     "tokens_per_cpu_s": tokens / cpu})
        print(f"| {bs} | {rollouts} | {tokens} | {seconds:.2f} | {tokens / seconds:.0f} | {rollouts / seconds:.1f} "
              f"| {cpu:.2f} | {tokens / cpu:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(torch.device("cpu")), "args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
