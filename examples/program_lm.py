"""A causal LM whose next-token logits are a Python function of the prefix, and a task built
on it whose CFT critical tokens are known by construction (for tests and examples).

:class:`ProgramLM` is a Hugging Face ``PreTrainedModel`` with ``generate``: it keeps the
token history in the KV cache (one layer; the "keys" are the token ids), drops the positions
the attention mask marks as padding, and asks its program for the logits after each prefix.
So it decodes, caches and pads like a real model while its behaviour is exact.

:class:`HalfSum`: the prompt ``"a+b="``, the response
``".." + str(a + b) + "..." + "<Answer>" + str((a + b) // 2) + "</Answer>"`` then EOS.
The answer is computed from the sum *as written in the response*. At each position the
chosen token has logit 5, the 2nd and 3rd choices 3 and 2:

* the sum's digits ``d``: ``(d + 1) % 10``, ``(d + 2) % 10`` (any change of the sum changes
  the answer), except its last digit: ``(d + 2) % 10``, ``d ^ 1`` (the second keeps
  ``sum // 2``, so that token is critical under ``rule="any"`` only);
* the answer's digits: ``(d + 1) % 10``, ``(d + 2) % 10``;
* the filler, ``<Answer>``, ``</Answer>`` and EOS: ``","`` and ``"~"`` (filler and EOS are
  harmless, a broken tag loses the answer).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

Program = Callable[[list[int]], Sequence[float]]


class ProgramConfig(PretrainedConfig):
    model_type = "sftkey_program_lm"

    def __init__(self, vocab_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.num_hidden_layers = 1


class ProgramLM(PreTrainedModel, GenerationMixin):
    """``logits[b, t] = program(tokens of row b up to t, padding dropped)``, float32."""

    config_class = ProgramConfig

    def __init__(self, config: ProgramConfig, program: Program):
        super().__init__(config)
        self.program = program
        self.anchor = nn.Parameter(torch.zeros(1))  # a device and a dtype for generate
        self.post_init()

    def forward(self, input_ids, attention_mask=None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        history = input_ids
        if cache is not None:
            as_keys = input_ids.to(torch.float64)[:, None, :, None]
            history = cache.update(as_keys, as_keys, 0)[0][:, 0, :, 0].long()
        if attention_mask is None:
            attention_mask = torch.ones_like(history)
        new = input_ids.shape[1]
        logits = torch.zeros(history.shape[0], new, self.config.vocab_size)
        for b, (row, keep) in enumerate(zip(history.tolist(), attention_mask.tolist())):
            for j, t in enumerate(range(len(row) - new, len(row))):
                prefix = [tok for tok, k in zip(row[:t + 1], keep[:t + 1]) if k]
                logits[b, j] = torch.tensor(self.program(prefix), dtype=torch.float32)
        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
        return CausalLMOutputWithPast(logits=logits, **{"cache" if "cache" in fields else "past_key_values": cache})


class HalfSum:
    """The task of the module docstring: its tokenizer, its program, its model, and the
    critical response positions by construction."""

    FILLER_BEFORE, FILLER_AFTER = 2, 3
    TOKENS = ["<pad>", "</s>", *"0123456789", "+", "=", ".", ",", "~", "<Answer>", "</Answer>"]

    def __init__(self):
        self.id = {t: i for i, t in enumerate(self.TOKENS)}
        backend = Tokenizer(models.WordLevel(self.id, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"</?Answer>|."), behavior="isolated")
        backend.decoder = decoders.Fuse()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                 padding_side="left")

    def model(self) -> ProgramLM:
        config = ProgramConfig(vocab_size=len(self.TOKENS), pad_token_id=0, eos_token_id=1)
        return ProgramLM(config, self.program).eval()

    @staticmethod
    def prompt(a: int, b: int) -> str:
        return f"{a}+{b}="

    def _layout(self, sum_digits: int, answer: str) -> tuple[int, int, int]:
        """Response positions where the sum starts, ``<Answer>`` stands, ``</Answer>`` stands."""
        first = self.FILLER_BEFORE
        tag = first + sum_digits + self.FILLER_AFTER
        return first, tag, tag + 1 + len(answer)

    def _choices(self, prefix: list[str]) -> tuple[str, str, str]:
        """The 1st, 2nd and 3rd choice after ``prefix`` (token strings, from the prompt on)."""
        if "=" not in prefix:
            return ".", ",", "~"
        eq = prefix.index("=")
        a, b = "".join(prefix[:eq]).split("+")
        sum_text, response = str(int(a) + int(b)), prefix[eq + 1:]
        first, tag, _ = self._layout(len(sum_text), "")
        p = len(response)
        if first <= p < first + len(sum_text):
            d = int(sum_text[p - first])
            if p == first + len(sum_text) - 1:
                return str(d), str((d + 2) % 10), str(d ^ 1)
            return str(d), str((d + 1) % 10), str((d + 2) % 10)
        if p <= tag:
            return ("<Answer>" if p == tag else "."), ",", "~"
        answer = str(int("".join(response[first:first + len(sum_text)])) // 2)  # from the sum as written
        close = self._layout(len(sum_text), answer)[2]
        if p < close:
            d = int(answer[p - tag - 1])
            return str(d), str((d + 1) % 10), str((d + 2) % 10)
        return ("</Answer>" if p == close else "</s>"), ",", "~"

    def program(self, prefix: list[int]) -> list[float]:
        logits = [0.0] * len(self.TOKENS)
        for value, token in zip((5.0, 3.0, 2.0), self._choices([self.TOKENS[i] for i in prefix])):
            logits[self.id[token]] = value
        return logits

    def response(self, a: int, b: int) -> str:
        """The model's (right) response to ``a + b``, EOS not included."""
        return f"{'.' * self.FILLER_BEFORE}{a + b}{'.' * self.FILLER_AFTER}<Answer>{(a + b) // 2}</Answer>"

    def example(self, a: int, b: int) -> dict:
        return {"prompt": self.prompt(a, b), "answer": (a + b) // 2}

    def critical(self, a: int, b: int, rule: str = "any") -> list[int]:
        """The critical response positions of problem ``a + b`` under ``rule``."""
        sum_text = str(a + b)
        first, tag, close = self._layout(len(sum_text), str((a + b) // 2))
        digits = range(first, first + len(sum_text) - (rule == "all"))
        return [*digits, *range(tag, close + 1)]
