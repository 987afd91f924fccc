"""SFTKey's key tokens: find the final-answer span of a response, map it to tokens, weight them.

SFTKey (Shi et al., 2025) trains in two stages on responses shaped like
``<Thinking> chain of thought </Thinking><Answer> answer </Answer>``: stage 1 is ordinary
SFT on every response token; stage 2 keeps the whole sequence as context but puts the loss
on the *key* (answer) tokens only. This module builds the ``labels`` and ``token_weights``
(aligned to labels, as :func:`sftkey.linear_cross_entropy` takes them) for either stage,
or for a blend of the two.

Conventions:

* A key span is a character span ``(start, end)`` of the answer *content*, whitespace
  stripped; ``include_tags=True`` widens it to the marker around the content (``<Answer>``
  and ``</Answer>``, ``\\boxed{`` and ``}``, ``The answer is``, ``####``; for a caller's regex,
  the whole match around group 1).
* A token is a key token when its ``offset_mapping`` span overlaps the key span.
* The text before the response (the prompt with the tokenizer's special tokens, or a chat
  template's rendering up to the response) and the response are tokenized separately and
  their ids concatenated, as generation sees them: the prompt alone, then its continuation.
  No token crosses the boundary; a separator (a space, a newline) is the caller's to write
  into the prompt or the response.
* Response tokens are those of the response text, plus the end-of-response tokens right
  after it: the special tokens (EOS, a chat template's end-of-turn) that follow it, with any
  whitespace tokens between. They are trained in stage 1; with ``include_eos=True`` (the
  default) they also count as key tokens, so stage 2 still teaches the model to stop
  (without them, a key-only stage 2 unlearns stopping: examples/README.md).
* A response token whose weight is 0 gets label ``-100``: stage 2 keeps the chain of thought
  as input (context) but ignores it as a target, so any loss (Hugging Face's own, a
  ``num_items_in_batch`` normalizer, token accuracy) counts the key tokens only.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

IGNORE_INDEX = -100


class KeyMatch(NamedTuple):
    """One candidate key: content span ``[start, end)`` and the span with its markers."""

    start: int
    end: int
    outer_start: int
    outer_end: int


KeyFinder = Callable[[str], Optional[tuple[int, int]]]
KeyPattern = Union[str, "re.Pattern[str]", KeyFinder]


def _strip(text: str, start: int, end: int, outer_start: int, outer_end: int) -> Optional[KeyMatch]:
    """The match with whitespace stripped from its content; None when the content is empty."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return KeyMatch(start, end, outer_start, outer_end) if start < end else None


def _regex_finder(regex: "re.Pattern[str]") -> Callable[[str], list[KeyMatch]]:
    """Candidates of a regex: the content is group 1 (the whole match without groups)."""
    group = 1 if regex.groups else 0

    def find(text: str) -> list[KeyMatch]:
        found = (_strip(text, *m.span(group), *m.span()) for m in regex.finditer(text) if m.start(group) != -1)
        return [k for k in found if k is not None]

    return find


def _boxed(text: str) -> list[KeyMatch]:
    """Outermost ``\\boxed{...}`` contents, by a balanced-brace scan (``\\{`` ``\\}`` escaped)."""
    opener = "\\boxed{"
    out = []
    i = text.find(opener)
    while i != -1:
        depth, j = 1, i + len(opener)
        while j < len(text):
            ch = text[j]
            if ch == "\\":
                j += 1
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth:  # unclosed: a later box may still be whole
            i = text.find(opener, i + len(opener))
            continue
        match = _strip(text, i + len(opener), j, i, j + 1)
        if match is not None:
            out.append(match)
        i = text.find(opener, j + 1)
    return out


# Up to the end of the sentence (., ! or ? before whitespace or the end, so "3.5" stays whole) or line.
_TO_SENTENCE_END = r"(.*?)(?=[.!?](?:\s|\Z)|\n|\Z)"
_TO_SENTENCE_END_ZH = r"(.*?)(?=[。！？\n]|[.!?](?:\s|\Z)|\Z)"

KEY_PATTERNS: dict[str, Callable[[str], list[KeyMatch]]] = {
    "answer_tag": _regex_finder(re.compile(r"<Answer>(.*?)</Answer>", re.S)),
    "answer_tag_lower": _regex_finder(re.compile(r"<answer>(.*?)</answer>", re.S)),
    "boxed": _boxed,
    "gsm8k": _regex_finder(re.compile(r"(?:^|(?<=\s))####(.*)$", re.M)),
    "the_answer_is": _regex_finder(re.compile(r"\b[Tt]he (?:final )?answer is:?" + _TO_SENTENCE_END)),
    "answer_zh": _regex_finder(re.compile(r"(?:最终)?答案(?:是|为|：|:)" + _TO_SENTENCE_END_ZH)),
}
"""Built-in key finders by name; each returns every candidate, in text order.

``answer_tag``: the paper's ``<Answer>...</Answer>`` (case-sensitive, closed tags only);
``answer_tag_lower``: ``<answer>...</answer>``; ``boxed``: ``\\boxed{...}`` with nested
braces, outermost boxes only; ``gsm8k``: ``####`` at the start of a line or after whitespace
(``"... = 8 . #### 8"``, as a decode that loses newlines writes it), to the end of the line (a
Markdown ``####`` heading matches too); ``the_answer_is``: ``The (final) answer is``
to the end of the sentence or line; ``answer_zh``: ``答案是`` / ``答案：`` to ``。`` or the line end.
"""

DEFAULT_PATTERNS: tuple[str, ...] = (
    "answer_tag", "answer_tag_lower", "boxed", "gsm8k", "the_answer_is", "answer_zh",
)
"""Tried in turn: the first pattern with any candidate decides."""


def _pattern_name(pattern: KeyPattern) -> str:
    if isinstance(pattern, str):
        return pattern
    if isinstance(pattern, re.Pattern):
        return f"regex:{pattern.pattern}"
    return getattr(pattern, "__name__", repr(pattern))


def _check_patterns(patterns: Union[KeyPattern, Sequence[KeyPattern]]) -> tuple[KeyPattern, ...]:
    if isinstance(patterns, (str, re.Pattern)) or callable(patterns):
        patterns = (patterns,)
    elif not isinstance(patterns, (list, tuple)):
        raise TypeError(
            f"patterns: expected a name, re.Pattern, callable or a list of them, got {type(patterns).__name__}"
        )
    if not patterns:
        raise ValueError("patterns: expected at least one pattern")
    for p in patterns:
        if isinstance(p, str) and p not in KEY_PATTERNS:
            raise ValueError(
                f"patterns: unknown key pattern {p!r}; expected one of {sorted(KEY_PATTERNS)}, "
                "a compiled re.Pattern or a callable"
            )
        if not isinstance(p, (str, re.Pattern)) and not callable(p):
            raise TypeError(f"patterns: expected a name, re.Pattern or callable, got {type(p).__name__}")
    return tuple(patterns)


def _candidates(text: str, pattern: KeyPattern) -> list[KeyMatch]:
    """Every candidate of one checked pattern in ``text``."""
    if isinstance(pattern, str):
        return KEY_PATTERNS[pattern](text)
    if isinstance(pattern, re.Pattern):
        return _regex_finder(pattern)(text)
    span = pattern(text)
    if span is None:
        return []
    if not (isinstance(span, tuple) and len(span) == 2 and all(isinstance(v, int) for v in span)):
        raise TypeError(f"patterns: callable {_pattern_name(pattern)} returned {span!r}; expected (start, end) or None")
    start, end = span
    if not 0 <= start < end <= len(text):
        raise ValueError(
            f"patterns: callable {_pattern_name(pattern)} returned span {span}; "
            f"expected 0 <= start < end <= {len(text)}"
        )
    return [KeyMatch(start, end, start, end)]


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices or isinstance(value, bool):
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _match_key(text: str, patterns: tuple[KeyPattern, ...], occurrence: str, include_tags: bool):
    """``(start, end, pattern name)`` of the key in ``text``, or None."""
    for pattern in patterns:
        found = _candidates(text, pattern)
        if found:
            k = found[-1] if occurrence == "last" else found[0]
            start, end = (k.outer_start, k.outer_end) if include_tags else (k.start, k.end)
            return start, end, _pattern_name(pattern)
    return None


def find_key_span(
    text: str,
    patterns: Union[KeyPattern, Sequence[KeyPattern]] = DEFAULT_PATTERNS,
    *,
    occurrence: str = "last",
    include_tags: bool = False,
) -> Optional[tuple[int, int]]:
    """Character span ``(start, end)`` of the key (final answer) in ``text``, or None.

    ``patterns``: a built-in name (:data:`KEY_PATTERNS`), a compiled regex (the span is
    group 1 if it has groups, else the whole match), a callable ``text -> (start, end) | None``,
    or a list of these tried in turn (the first with a candidate decides).
    ``occurrence``: ``"last"`` or ``"first"`` candidate of that pattern.
    ``include_tags``: the span includes the markers around the content.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    _check_choice("occurrence", occurrence, ("last", "first"))
    found = _match_key(text, _check_patterns(patterns), occurrence, bool(include_tags))
    return None if found is None else found[:2]


def spans_to_token_mask(offset_mapping: Sequence[Sequence[int]], spans: Iterable[tuple[int, int]]) -> list[bool]:
    """Per token, whether its ``[start, end)`` offsets overlap any span (zero-width tokens never do)."""
    spans = list(spans)
    return [
        e > s and any(s < span_end and e > span_start for span_start, span_end in spans)
        for s, e in offset_mapping
    ]


@dataclass
class KeySpanReport:
    """Counts of what happened to the examples encoded with it.

    ``without_key``: no key span found; ``truncated``: key tokens cut by ``max_length``
    (when none remains, the example also follows the no-key policy); ``dropped`` /
    ``zeroed``: examples the no-key policy removed / kept with weight 0;
    ``by_pattern``: examples per pattern that found their key.
    """

    examples: int = 0
    with_key: int = 0
    without_key: int = 0
    truncated: int = 0
    dropped: int = 0
    zeroed: int = 0
    by_pattern: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return self.examples - self.dropped


def _special_ids(tokenizer) -> set[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in decoder.items() if tok.special}


def _render_chat(tokenizer, messages: list, response: str) -> tuple[str, int, int]:
    """The chat-template text of ``messages`` + the response, and the response's range in it."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if messages else ""
    search_from = len(prefix) if full.startswith(prefix) else 0
    for rendered in (response, response.strip()):  # templates may trim the content
        pos = full.find(rendered, search_from)
        if rendered and pos != -1:
            return full, pos, pos + len(rendered)
    raise ValueError("messages: the chat template does not render the response text verbatim; cannot locate it")


def _encode(tokenizer, text: str, offset: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and offsets (shifted by ``offset``) of ``text`` tokenized on its own, no special tokens."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return list(enc["input_ids"]), [(s + offset, e + offset) for s, e in enc["offset_mapping"]]


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text (BOS; an EOS some add)."""
    marker = "x"
    plain = tokenizer(marker, add_special_tokens=False)["input_ids"]
    full = tokenizer(marker, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def prompt_ids(tokenizer, prompt: Optional[str]) -> list[int]:
    """The token ids of ``prompt`` as generation continues it: the tokenizer's leading special
    tokens (BOS), then the prompt's own tokens (not the special tokens some tokenizers append)."""
    before, _ = _special_ends(tokenizer)
    return before + _encode(tokenizer, prompt or "", 0)[0]


def _tokenize(tokenizer, response: str, prompt: Optional[str], messages: Optional[list], add_eos: bool):
    """``(text, response start, response end, ids, offsets)`` of one example: the text before
    the response and the rest tokenized separately (module docstring)."""
    if messages is not None:
        text, start, end = _render_chat(tokenizer, messages, response)
        head_ids, head_offsets = _encode(tokenizer, text[:start], 0)
        rest_ids, rest_offsets = _encode(tokenizer, text[start:], start)
        return text, start, end, head_ids + rest_ids, head_offsets + rest_offsets
    prompt = prompt or ""
    text = prompt + response
    before, after = _special_ends(tokenizer)
    head_ids, head_offsets = _encode(tokenizer, prompt, 0)
    rest_ids, rest_offsets = _encode(tokenizer, response, len(prompt))
    ids = before + head_ids + rest_ids + after
    offsets = [(0, 0)] * len(before) + head_offsets + rest_offsets + [(len(text), len(text))] * len(after)
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        offsets.append((len(text), len(text)))
    return text, len(prompt), len(text), ids, offsets


def _end_tokens(text: str, ids: list[int], offsets: list, after: int, special: set[int]) -> range:
    """Positions from ``after`` through the last special token of the run of special and
    whitespace tokens that starts there (EOS, end-of-turn)."""
    stop = after
    for j in range(after, len(ids)):
        if ids[j] in special:
            stop = j + 1
        elif not text[offsets[j][0]:offsets[j][1]].isspace():
            break
    return range(after, stop)


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite weight >= 0, got {value}")
    return float(value)


def encode_example(
    tokenizer,
    response: str,
    prompt: Optional[str] = None,
    *,
    messages: Optional[list[Mapping[str, Any]]] = None,
    stage: int = 2,
    cot_weight: Optional[float] = None,
    key_weight: Optional[float] = None,
    patterns: Union[KeyPattern, Sequence[KeyPattern]] = DEFAULT_PATTERNS,
    occurrence: str = "last",
    include_tags: bool = False,
    include_eos: bool = True,
    add_eos: bool = True,
    max_length: Optional[int] = None,
    no_key: str = "drop",
    report: Optional[KeySpanReport] = None,
) -> Optional[dict[str, list]]:
    """Tokenize one example; return ``input_ids``, ``attention_mask``, ``labels``, ``token_weights``.

    The text is ``prompt + response`` tokenized with the tokenizer's special tokens (and its
    EOS appended when ``add_eos``), or, given ``messages`` (the turns before the response),
    the chat template's rendering of them followed by the response as the assistant turn.
    Only response tokens get labels.

    ``stage=1`` weighs every response token 1; ``stage=2`` weighs key tokens 1 and the rest
    0 (label -100); ``cot_weight`` / ``key_weight`` override the stage's weights (a blend).
    When the two weights differ, a response without key tokens follows ``no_key``: ``"drop"``
    returns None, ``"zero"`` keeps it with weight 0 (and label -100) everywhere.
    ``max_length`` truncates on the right. ``report`` is updated in place. ``patterns``,
    ``occurrence``, ``include_tags`` are :func:`find_key_span`'s. ``tokenizer`` must be a fast
    tokenizer (for ``offset_mapping``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenizer: expected a fast (Rust-backed) tokenizer; offset_mapping is required")
    if not isinstance(response, str):
        raise TypeError(f"response: expected str, got {type(response).__name__}")
    if prompt is not None and messages is not None:
        raise ValueError("prompt, messages: give one of them, not both")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt: expected str or None, got {type(prompt).__name__}")
    if messages is not None and not isinstance(messages, list):
        raise TypeError(f"messages: expected a list of message dicts, got {type(messages).__name__}")
    _check_choice("stage", stage, (1, 2))
    _check_choice("no_key", no_key, ("drop", "zero"))
    _check_choice("occurrence", occurrence, ("last", "first"))
    cot_weight = _check_weight("cot_weight", float(stage == 1) if cot_weight is None else cot_weight)
    key_weight = _check_weight("key_weight", 1.0 if key_weight is None else key_weight)
    if cot_weight == key_weight == 0:
        raise ValueError("cot_weight, key_weight: both are 0, nothing would be trained")
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length: expected an int or None, got {type(max_length).__name__}")
        if max_length < 1:
            raise ValueError(f"max_length: expected >= 1, got {max_length}")
    if report is not None and not isinstance(report, KeySpanReport):
        raise TypeError(f"report: expected a KeySpanReport or None, got {type(report).__name__}")
    patterns = _check_patterns(patterns)

    text, start, end, ids, offsets = _tokenize(tokenizer, response, prompt, messages, add_eos)
    in_response = spans_to_token_mask(offsets, [(start, end)])
    found = _match_key(text[start:end], patterns, occurrence, bool(include_tags))
    is_key = spans_to_token_mask(offsets, [(start + found[0], start + found[1])] if found else [])
    key_cut = max_length is not None and any(is_key[max_length:])
    if any(in_response):
        last = max(i for i, r in enumerate(in_response) if r)
        for j in _end_tokens(text, ids, offsets, last + 1, _special_ids(tokenizer)):
            in_response[j] = True
            is_key[j] = bool(include_eos and found)

    if report is not None:
        report.examples += 1
        report.with_key += found is not None
        report.without_key += found is None
        if found:
            report.by_pattern[found[2]] += 1
        report.truncated += key_cut
    if max_length is not None:
        ids, in_response, is_key = ids[:max_length], in_response[:max_length], is_key[:max_length]

    weights = [(key_weight if k else cot_weight) if r else 0.0 for r, k in zip(in_response, is_key)]
    if cot_weight != key_weight and not any(is_key):
        if no_key == "drop":
            if report is not None:
                report.dropped += 1
            return None
        if report is not None:
            report.zeroed += 1
        weights = [0.0] * len(ids)
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [t if w > 0 else IGNORE_INDEX for t, w in zip(ids, weights)],
        "token_weights": weights,
    }


def _example_fields(example: Any, i: int) -> tuple[str, Optional[str], Optional[list]]:
    """``(response, prompt, messages)`` of one example: this package's row (``response`` and
    ``prompt`` or ``messages``, the turns before it) or a TRL row (``messages`` ending with the
    assistant's turn; ``prompt`` and ``completion``, as strings or as message lists)."""
    if not isinstance(example, Mapping):
        raise ValueError(f"examples[{i}]: expected a mapping, got {type(example).__name__}")
    keys = set(example)
    if "response" in keys:
        allowed = {"response", "prompt", "messages"}
    elif "completion" in keys:
        allowed = {"prompt", "completion"}
    elif "messages" in keys:
        allowed = {"messages"}
    else:
        raise ValueError(f"examples[{i}]: expected a 'response' (with 'prompt' or 'messages'), or TRL's 'prompt' "
                         f"and 'completion', or 'messages' ending with the assistant's turn; got {sorted(keys)}")
    unknown = keys - allowed
    if unknown:
        raise ValueError(f"examples[{i}]: unexpected keys {sorted(unknown)}; expected {sorted(allowed)} "
                         "(remove the other columns first)")
    if "response" in keys:
        return example["response"], example.get("prompt"), example.get("messages")
    if "completion" in keys:
        prompt, completion = example.get("prompt"), example["completion"]
        if isinstance(completion, str):
            return completion, prompt, None
        if not (isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], Mapping)
                and completion[0].get("role") == "assistant"):
            raise ValueError(f"examples[{i}]['completion']: expected a string or one assistant message")
        if prompt is not None and not isinstance(prompt, list):
            raise ValueError(f"examples[{i}]['prompt']: a conversational completion needs the prompt as messages")
        return completion[0].get("content"), None, list(prompt or [])
    messages = example["messages"]
    if not (isinstance(messages, list) and messages and isinstance(messages[-1], Mapping)
            and messages[-1].get("role") == "assistant"):
        raise ValueError(f"examples[{i}]['messages']: expected a list of messages ending with the assistant's turn "
                         "(the response to train on)")
    return messages[-1].get("content"), None, list(messages[:-1])


def build_features(tokenizer, examples: Iterable[Mapping[str, Any]], **options) -> tuple[list[dict], KeySpanReport]:
    """Encode ``examples`` with :func:`encode_example`'s ``options``; dropped examples are left
    out, with a warning that counts them and names the first, and a ``ValueError`` when every
    example is dropped.

    Rows: ``{"response", "prompt"}`` or ``{"response", "messages"}`` (the turns before the
    response), or TRL's formats: ``{"prompt", "completion"}`` (strings, or a message list and
    one assistant message) and ``{"messages"}`` ending with the assistant's turn. Other keys
    are refused. Returns the features and the :class:`KeySpanReport` of the run.
    """
    if "report" in options:
        raise TypeError("report: build_features makes and returns its own report")
    report, features, first_dropped = KeySpanReport(), [], None
    for i, example in enumerate(examples):
        response, prompt, messages = _example_fields(example, i)
        encoded = encode_example(tokenizer, response, prompt, messages=messages, report=report, **options)
        if encoded is not None:
            features.append(encoded)
        elif first_dropped is None:
            first_dropped = (i, response)
    if report.dropped:
        i, response = first_dropped
        what = (f"{report.dropped} of {report.examples} examples have no key tokens (no key span found: "
                f"{report.without_key}; key cut by max_length: {report.truncated}) and were dropped "
                f"(no_key='drop'); the first, examples[{i}], ends {response[-80:]!r}. Patterns tried: "
                f"{_check_patterns(options.get('patterns', DEFAULT_PATTERNS))}")
        if not features:
            raise ValueError(f"examples: every example was dropped. {what}")
        warnings.warn(f"build_features: {what}", stacklevel=2)
    return features, report
