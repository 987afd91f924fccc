"""The Axolotl plugin under a real ``axolotl train`` (run by scripts/check-axolotl.sh in Axolotl's venv).

Builds a tiny Llama and a byte-level BPE tokenizer from local text, and pre-tokenized SFTKey
data (stage 1 without weights; stage 2 with key-answer weights and a chain-of-thought weight
of 0.1), then runs ``axolotl train --launcher python`` on them: Axolotl alone, and with
``sftkey.integrations.axolotl.SFTKeyPlugin`` for the ``sft``, ``dft`` and ``asft`` presets
and for token weights, and configs the plugin must refuse. Each run's first-step loss (one
batch of every example, before any update) is checked against the loss of the model itself
on that batch, computed here from its logits (ASFT's KL to the frozen copy is 0 there, so its
first loss is DFT's); the runs' losses must also stay finite and the plugin's runs must log
entropy and mean_token_accuracy. (``batch_flattening`` needs a varlen attention backend,
flash-attention 2, which a CPU lacks: its collator is tested in tests/test_data.py.)
Prints one line per run and exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sftkey_arithmetic as arithmetic  # noqa: E402

from sftkey.methods import keys  # noqa: E402
from sftkey.methods.data import TokenWeightCollator  # noqa: E402

EXAMPLES = 16
STEPS = 5


def build(tmp: Path) -> tuple[Path, list[dict], list[dict]]:
    problems = arithmetic.make_problems(EXAMPLES, seed=3)
    texts = [p["prompt"] + p["response"] for p in arithmetic.make_problems(400, seed=4)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model_dir = tmp / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    examples = [{"prompt": p["prompt"], "response": p["response"]} for p in problems]
    stage1, _ = keys.build_features(tokenizer, examples, stage=1)
    stage2, _ = keys.build_features(tokenizer, examples, stage=2, cot_weight=0.1)
    stage1 = [{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in stage1]
    return model_dir, stage1, stage2


def reference_losses(model_dir: Path, stage1: list[dict], stage2: list[dict]) -> dict[str, float]:
    """The model's own first-batch losses from its logits: NLL and DFT over every labelled token
    of stage 1, and the weighted mean of stage 2."""
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    out = {}
    for name, features in (("stage1", stage1), ("stage2", stage2)):
        batch = TokenWeightCollator(pad_token_id=0)(features)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        y = batch["labels"][:, 1:]
        valid = y != -100
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
        if name == "stage1":
            out["nll"] = (-logp[valid]).mean().item()
            out["dft"] = (-logp * logp.exp())[valid].mean().item()
        else:
            a = batch["token_weights"][:, 1:].double()
            out["weighted"] = ((-logp * a)[valid].sum() / a[valid].sum()).item()
    return out


def config(tmp: Path, name: str, model_dir: Path, data: Path, **extra) -> Path:
    cfg = {
        "base_model": str(model_dir), "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(data), "ds_type": "json"}],
        "dataset_prepared_path": str(tmp / f"prepared-{name}"), "val_set_size": 0,
        "output_dir": str(tmp / f"out-{name}"), "sequence_len": 256, "sample_packing": False,
        "micro_batch_size": EXAMPLES, "gradient_accumulation_steps": 1, "max_steps": STEPS,
        "learning_rate": 1e-3, "optimizer": "adamw_torch", "lr_scheduler": "constant", "warmup_steps": 0,
        "bf16": False, "fp16": False, "tf32": False, "logging_steps": 1, "save_strategy": "steps",
        "save_steps": STEPS, "seed": 0, "use_tensorboard": False, "dataloader_num_workers": 0,
        "shuffle_merged_datasets": False, **extra,
    }
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(path: Path) -> tuple[int, float, str]:
    start = time.perf_counter()
    venv_bin = str(Path(sys.executable).parent)  # the launcher runs `python` from PATH: this venv's
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run([os.path.join(venv_bin, "axolotl"), "train", str(path), "--launcher", "python"],
                          capture_output=True, text=True, env=env, timeout=900)
    return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


def logged(out_dir: Path) -> list[dict]:
    state = json.loads((out_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    import axolotl
    import trl

    print(f"check-axolotl: python {platform.python_version()}, torch {torch.__version__}, axolotl "
          f"{axolotl.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="sftkey-axolotl-"))
    model_dir, stage1, stage2 = build(tmp)
    for name, rows in (("stage1", stage1), ("stage2", stage2)):
        with open(tmp / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    want = reference_losses(model_dir, stage1, stage2)
    plugin = {"plugins": ["sftkey.integrations.axolotl.SFTKeyPlugin"], "sftkey_fused_loss": True}
    runs = [  # name, data, extra config, the reference of its first loss
        ("axolotl", "stage1", {}, "nll"),
        ("sftkey-sft", "stage1", plugin, "nll"),
        ("sftkey-dft", "stage1", {**plugin, "sftkey_preset": "dft"}, "dft"),
        ("sftkey-weights", "stage2", {**plugin, "sftkey_token_weights": True}, "weighted"),
        ("sftkey-asft", "stage1", {**plugin, "sftkey_preset": "asft"}, "dft"),  # the KL to the copy is 0 at first
    ]
    refused = [
        ("refuse-liger", {**plugin, "liger_fused_linear_cross_entropy": True}, "liger_fused_linear_cross_entropy"),
        ("refuse-packing", {**plugin, "sftkey_token_weights": True, "sample_packing": True}, "sample_packing"),
        ("refuse-preset", {**plugin, "sftkey_preset": "dft", "sftkey_dft": False}, "contradicts"),
    ]
    failures = 0
    for name, data, extra, ref in runs:
        rc, seconds, output = train(config(tmp, name, model_dir, tmp / f"{data}.jsonl", **extra))
        if rc != 0:
            print(f"FAIL {name}: axolotl train exited {rc}\n{output[-3000:]}")
            failures += 1
            continue
        logs = logged(tmp / f"out-{name}")
        first = logs[0]["loss"]
        rel = abs(first - want[ref]) / abs(want[ref])
        metrics = name == "axolotl" or all("entropy" in h and "mean_token_accuracy" in h for h in logs)
        ok = len(logs) == STEPS and rel < 1e-5 and metrics and all(h["loss"] == h["loss"] for h in logs)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {STEPS} steps in {seconds:.1f} s; first loss {first:.7f}, the "
              f"model's own {ref} {want[ref]:.7f} (rel. diff {rel:.1e}); losses "
              f"{[round(h['loss'], 4) for h in logs]}" + ("" if metrics else "; entropy/mean_token_accuracy missing"))
    for name, extra, match in refused:
        rc, seconds, output = train(config(tmp, name, model_dir, tmp / "stage2.jsonl", **extra))
        ok = rc != 0 and match in output
        failures += not ok
        line = next((ln.strip() for ln in output.splitlines() if match in ln), output.strip().splitlines()[-1:])
        print(f"{'ok  ' if ok else 'FAIL'} {name}: exit {rc} in {seconds:.1f} s: {str(line)[:240]}")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    print(f"check-axolotl: {len(runs) + len(refused) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
