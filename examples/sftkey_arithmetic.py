"""SFTKey vs plain SFT on synthetic arithmetic word problems: a tiny Llama, from scratch, on CPU.

Every response has the SFTKey paper's format ``<Thinking> chain of thought </Thinking><Answer> N
</Answer>``. Stage 1 trains on every response token; then the same model continues for the
same number of steps either on every response token again (plain SFT) or on the key answer
tokens and the EOS only, with the chain of thought as context (SFTKey stage 2; without the
EOS too with ``--stage2-eos``). The runs share stage 1 and the stage-2 learning rate, so the
only difference is which tokens stage 2 trains. The script reports, by greedy decoding on
held-out problems after each stage, the answer accuracy, the share of exactly right chains
of thought and the share of completions that stop.
All losses go through sftkey's fused loss (no logits are built), and the trainer logs
``entropy`` and ``mean_token_accuracy`` from its statistics.

    python examples/sftkey_arithmetic.py                 # defaults: a few minutes on 2 cores
    python examples/sftkey_arithmetic.py --stage2-eos both  # SFTKey's stage 2 with and without the EOS
    python examples/sftkey_arithmetic.py --stage1-steps 300 --stage2-steps 100 --eval 100
"""
from __future__ import annotations

import argparse
import copy
import random
import re
import tempfile
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments

from sftkey.methods import keys
from sftkey.methods.data import TokenWeightCollator
from sftkey.methods.trainer import SFTKeyTrainer, Stage

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lia"]
ITEMS = ["apples", "books", "coins", "marbles", "pens", "shells", "stamps", "cards"]
ANSWER = re.compile(r"<Answer>(\d+)</Answer>")


def make_problem(rng: random.Random) -> dict:
    """One word problem with 1 to 3 additions / subtractions, its chain of thought and answer."""
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    total = rng.randint(2, 30)
    question = [f"{name} has {total} {item} ."]
    thoughts = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5 or total < 2:
            n = rng.randint(1, 20)
            question.append(rng.choice([f"{name} buys {n} more .", f"{friend} gives {name} {n} {item} ."]))
            thoughts.append(f"{total} + {n} = {total + n} .")
            total += n
        else:
            n = rng.randint(1, total - 1)
            question.append(rng.choice([f"{name} gives {n} to {friend} .", f"{name} loses {n} {item} ."]))
            thoughts.append(f"{total} - {n} = {total - n} .")
            total -= n
    question.append(f"How many {item} does {name} have now ?")
    return {
        "prompt": "Question : " + " ".join(question) + "\n",
        "response": f"<Thinking> {' '.join(thoughts)} </Thinking><Answer> {total} </Answer>",
        "answer": total,
    }


def make_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (digits one token each) with the vocabulary of ``texts``."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)} | set("0123456789"))
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="left")


def build_model(tokenizer, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


@torch.no_grad()
def completion_metrics(model, tokenizer, problems: list[dict], batch_size: int = 128,
                       max_new_tokens: int = 48) -> dict:
    """Over the greedy completions of ``problems``: the share whose ``<Answer>`` is the right
    number, whose chain of thought is exactly the true one, and that stop (EOS) within the budget."""
    model.eval()
    correct = chains = stopped = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        batch = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for p, ids in zip(chunk, out[:, batch["input_ids"].shape[1]:]):
            text = "".join(tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True))
            found = ANSWER.search(text)
            correct += found is not None and int(found.group(1)) == p["answer"]
            chains += text.split("</Thinking>")[0] == p["response"].split("</Thinking>")[0].replace(" ", "")
            stopped += tokenizer.eos_token_id in ids.tolist()
    n = len(problems)
    return {"answer_accuracy": correct / n, "chain_accuracy": chains / n, "stop_rate": stopped / n}


def key_loss(model, features: list[dict], collator) -> float:
    """Mean loss on the key tokens of stage-2 ``features``."""
    model.eval()
    with torch.no_grad():
        batch = collator(features)
        return model(**batch).loss.item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=8000, help="training problems")
    parser.add_argument("--eval", type=int, default=300, help="held-out problems for answer accuracy")
    parser.add_argument("--stage1-steps", type=int, default=1200)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--stage1-lr", type=float, default=3e-3)
    parser.add_argument("--stage2-lr", type=float, default=1e-3)
    parser.add_argument("--stage2-cot-weight", type=float, default=0.0,
                        help="SFTKey stage-2 weight of chain-of-thought tokens (0: key tokens only; a blend otherwise)")
    parser.add_argument("--stage2-eos", choices=("on", "off", "both"), default="on",
                        help="SFTKey stage 2 also trains the EOS (keys.build_features' include_eos, its default: on), "
                             "not (off), or one run of each from the same stage 1 (both)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    problems = make_problems(args.train + args.eval, args.seed)
    train, held_out = problems[:args.train], problems[args.train:]
    tokenizer = build_tokenizer([p["prompt"] + p["response"] for p in problems])
    examples = [{"prompt": p["prompt"], "response": p["response"]} for p in train]
    stage1, _ = keys.build_features(tokenizer, examples, stage=1)
    eos_choices = {"on": (True,), "off": (False,), "both": (True, False)}[args.stage2_eos]
    stage2 = {eos: keys.build_features(tokenizer, examples, stage=2, cot_weight=args.stage2_cot_weight,
                                       include_eos=eos) for eos in eos_choices}
    report = next(iter(stage2.values()))[1]
    print(f"{len(train)} training problems ({report.with_key} with a key span), {len(held_out)} held out; "
          f"vocabulary {len(tokenizer)}")
    eval_keys, _ = keys.build_features(tokenizer, [{"prompt": p["prompt"], "response": p["response"]}
                                                   for p in held_out], stage=2, include_eos=False)
    collator = TokenWeightCollator.from_tokenizer(tokenizer, padding_side="right")

    model = build_model(tokenizer, args.hidden, args.layers, args.seed)
    out_dir = tempfile.mkdtemp(prefix="sftkey_arithmetic_")
    training = TrainingArguments(
        out_dir, per_device_train_batch_size=args.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05,
        weight_decay=0.0, logging_steps=25, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=args.seed, data_seed=args.seed)

    def run(model, stage: Stage) -> None:
        trainer = SFTKeyTrainer(model=model, args=training, data_collator=collator)
        start = time.time()
        (output,) = trainer.train_stages(stage)
        last = [h for h in trainer.state.log_history if "entropy" in h][-1]
        print(f"  {stage.name}: {stage.max_steps} steps in {time.time() - start:.0f} s, mean loss "
              f"{output.training_loss:.3f}; last log: entropy {last['entropy']:.3f}, "
              f"token accuracy {last['mean_token_accuracy']:.3f}")

    def report_accuracy(label: str, model) -> dict:
        result = {**completion_metrics(model, tokenizer, held_out), "key_loss": key_loss(model, eval_keys, collator)}
        print(f"  {label}: answer accuracy {result['answer_accuracy']:.3f}, chain accuracy "
              f"{result['chain_accuracy']:.3f}, stop rate {result['stop_rate']:.3f}, "
              f"held-out key-token loss {result['key_loss']:.4f}")
        return result

    results = {}
    print(f"Stage 1 (all response tokens, lr {args.stage1_lr}):")
    run(model, Stage(stage1, max_steps=args.stage1_steps, learning_rate=args.stage1_lr, name="stage1"))
    results["stage 1"] = report_accuracy("after stage 1", model)

    key_tokens = "key tokens only" if args.stage2_cot_weight == 0 else f"key tokens, CoT x {args.stage2_cot_weight}"
    arms = [("SFT", stage1, "all response tokens")]
    for eos, (data, _) in stage2.items():
        name = "SFTKey" if len(stage2) == 1 else f"SFTKey {'with' if eos else 'without'} EOS"
        arms.append((name, data, key_tokens + (" and EOS" if eos else ", not EOS")))
    for label, data, tokens in arms:
        print(f"Stage 2, {label} ({tokens}, lr {args.stage2_lr}):")
        continued = copy.deepcopy(model)
        run(continued, Stage(data, max_steps=args.stage2_steps, learning_rate=args.stage2_lr, name=label))
        results[label] = report_accuracy(f"{label} after stage 2", continued)

    print("\n| after | answer accuracy | chain accuracy | stop rate | held-out key-token loss |\n|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['answer_accuracy']:.3f} | {r['chain_accuracy']:.3f} | {r['stop_rate']:.3f} "
              f"| {r['key_loss']:.4f} |")
    return results


if __name__ == "__main__":
    main()
