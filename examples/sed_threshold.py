"""SED-SFT's threshold calibrated from the model itself, then SED-SFT steps with it.

A tiny Llama (from a config, 2 layers, hidden 64, seeded) first learns a little of a
synthetic task (:class:`program_lm.HalfSum`'s texts, ``"a+b=..{a+b}...<Answer>..."``)
with plain SFT, standing in for the pretrained model SED-SFT starts from. Then the
threshold ``tau`` is calibrated on the first 100 validation samples with that initial
model, for each calibrated set of :data:`sftkey.methods.SED_SFT_SETTINGS` (the authors'
trainer and paper script calibrate with the top-10 mass but gate the loss on the top-2 mass;
this package's ``"consistent"`` set uses ``k = 2`` for both; the authors' ``"sed_triton"`` run
has ``tau = 0.95`` fixed, on the top-10 mass), and the script reports which share of the
trained tokens each ``tau`` gates, on each setting's own gate ``k``. Last, a few SED-SFT
steps with the consistent set. Every loss runs through sftkey's fused statistics; no logits
are built.

    python examples/sed_threshold.py                    # well under a minute
"""
from __future__ import annotations

import argparse
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sftkey
from sftkey import methods
from sftkey.methods.data import TokenWeightCollator
from program_lm import HalfSum
from sftkey.methods.sed import top_mass


def features(task: HalfSum, n: int, seed: int) -> list[dict]:
    """``input_ids`` and ``labels`` (the response and EOS; the prompt ignored) of ``n`` problems."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        prompt = task.tokenizer(task.prompt(a, b))["input_ids"]
        response = task.tokenizer(task.response(a, b))["input_ids"] + [task.tokenizer.eos_token_id]
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


def head_stats(model, batch, topk: int):
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return sftkey.logit_stats(hidden[:, :-1], model.lm_head.weight, batch["labels"][:, 1:], topk=topk)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup-steps", type=int, default=60, help="plain SFT steps before calibrating")
    parser.add_argument("--sed-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    task = HalfSum()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(task.TOKENS), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1))
    collate = TokenWeightCollator.from_tokenizer(task.tokenizer, padding_side="right")  # positions from 0
    train, val = features(task, 2000, args.seed), features(task, 100, args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def step(loss_of_stats, topk=0):
        batch = collate(random.sample(train, 32))
        st = head_stats(model, batch, topk)
        loss = methods.reduce(loss_of_stats(st), st)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    model.train()
    for _ in range(args.warmup_steps):
        sft_loss = step(methods.sft)
    model.eval()
    print(f"initial model: tiny Llama after {args.warmup_steps} SFT steps (loss {sft_loss:.3f})")

    with torch.no_grad():
        st_val = head_stats(model, collate(val), topk=16)
    summary = {}
    print("| setting | lam | gate k | calibration k | quantile (1 - cumsum_ratio) | tokens | tau | gated share |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for name, s in methods.SED_SFT_SETTINGS.items():
        tau = s.threshold
        if tau is None:
            tau = methods.calibrate_sed_threshold(model, s.quantile, s.calibration_k, data=val,
                                                  num_samples=s.num_samples, tokens=s.tokens)
        share = (top_mass(st_val, s.k)[st_val.valid] < tau).double().mean().item()
        summary[name] = {"tau": tau, "gated_share": share}
        print(f"| {name} | {s.lam} | {s.k} | {s.calibration_k or '-'} | {s.quantile if s.quantile is not None else '-'} "
              f"| {s.tokens if s.threshold is None else '-'} | {tau:.4f} | {share:.1%} |")

    chosen = methods.SED_SFT_SETTINGS["consistent"]
    tau = summary["consistent"]["tau"]
    model.train()
    for _ in range(args.sed_steps):
        sed_loss = step(lambda st: methods.sed_sft(st, lam=chosen.lam, threshold=tau, k=chosen.k), topk=chosen.k)
    summary["sed_loss"] = sed_loss
    print(f"SED-SFT ('consistent', tau {tau:.4f}): loss {sed_loss:.3f} after {args.sed_steps} steps")
    return summary


if __name__ == "__main__":
    main()
