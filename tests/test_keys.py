"""sftkey.methods.keys: key-span detection, token alignment, SFTKey stage labels and weights."""
import random
import re

import pytest

from sftkey.methods.keys import (
    DEFAULT_PATTERNS,
    IGNORE_INDEX,
    KEY_PATTERNS,
    KeySpanReport,
    build_features,
    encode_example,
    find_key_span,
    spans_to_token_mask,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRIMMING = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}</s>{% endfor %}"


def _corpus(n=300):
    rng = random.Random(0)
    words = "so we add the numbers then multiply each side first next compute total answer is".split()
    zh = ["首先计算", "然后相加", "答案是", "所以", "结果"]
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        cot = " ".join(rng.choices(words, k=8)) + f" {a} + {b} = {a + b}. " + rng.choice(zh)
        out += [
            f"<Thinking>{cot}</Thinking><Answer>{a + b}</Answer>",
            f"Question: what is {a} + {b}? {cot} The answer is {a + b}.",
            f"{cot} $\\boxed{{\\frac{{{a}}}{{{b}}}}}$ \n#### {a * b}",
        ]
    return out


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(_corpus(), trainer)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def _key_text(tok, feats):
    """Decoded tokens whose weight is positive."""
    return tok.decode([t for t, w in zip(feats["input_ids"], feats["token_weights"]) if w > 0])


# ---------------------------------------------------------------- key-span detection

@pytest.mark.parametrize(
    "text, key",
    [
        ("<Thinking>3 + 4 = 7</Thinking><Answer>7</Answer>", "7"),
        ("<Thinking>\nfirst...\n</Thinking>\n<Answer>\n  x = 2 or x = -2\n</Answer>", "x = 2 or x = -2"),
        ("<think>hmm</think><answer>Paris</answer>", "Paris"),
        ("<Answer>The answer is \\boxed{5}</Answer>", "The answer is \\boxed{5}"),  # tags outrank the rest
        ("so p = $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} is wrong; redo: \\boxed{x^{2}+\\sqrt{3}}", "x^{2}+\\sqrt{3}"),
        ("sets: \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),
        ("broken \\boxed{1 then \\boxed{2}", "2"),
        ("Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "72"),
        ("#### 1,234\n", "1,234"),
        ("Adding them up, the answer is 3.5. Done.", "3.5"),
        ("The final answer is: (B)\nBecause...", "(B)"),
        ("The answer is 4. Wait, no. The answer is 5.", "5"),
        ("So the answer is 42", "42"),
        ("先算 3×4=12，答案是 12。", "12"),
        ("最终答案：√2 ≈ 1.414", "√2 ≈ 1.414"),
        ("Ça fait π/2 🎉 — <Answer>π/2 ≈ 1.5708 ✓</Answer> 完毕", "π/2 ≈ 1.5708 ✓"),
        ("I am not sure.", None),
        ("<Answer>42", None),  # unclosed tag
        ("\\boxed{ }", None),  # empty content
        ("The answer is .", None),
        ("", None),
    ],
)
def test_find_key_span(text, key):
    span = find_key_span(text)
    assert (span if span is None else text[span[0]:span[1]]) == key


def test_occurrence_first_and_last():
    text = "\\boxed{1} ... \\boxed{2} ... \\boxed{3}"
    assert text[slice(*find_key_span(text))] == "3"
    assert text[slice(*find_key_span(text, occurrence="first"))] == "1"


@pytest.mark.parametrize(
    "text, outer",
    [
        ("cot <Answer> 7 </Answer>", "<Answer> 7 </Answer>"),
        ("so $\\boxed{\\frac{1}{2}}$.", "\\boxed{\\frac{1}{2}}"),
        ("x\n#### 72", "#### 72"),
        ("Thus the answer is 9. Bye", "the answer is 9"),
    ],
)
def test_include_tags(text, outer):
    assert text[slice(*find_key_span(text, include_tags=True))] == outer


def test_caller_patterns():
    text = "Reasoning... Final: 17 (checked). Final: 18 (checked)."
    assert text[slice(*find_key_span(text, re.compile(r"Final: (\d+)")))] == "18"
    assert text[slice(*find_key_span(text, re.compile(r"Final: \d+"), occurrence="first"))] == "Final: 17"
    outer = find_key_span(text, re.compile(r"Final: (\d+)"), include_tags=True)
    assert text[slice(*outer)] == "Final: 18"
    assert find_key_span(text, lambda t: (3, 5)) == (3, 5)
    last = text.rindex("18")
    assert find_key_span(text, [lambda t: None, "the_answer_is", re.compile(r"(\d+)")]) == (last, last + 2)
    assert find_key_span("The answer is 1. \\boxed{2}", ["the_answer_is", "boxed"]) == (14, 15)
    assert find_key_span("The answer is 1. \\boxed{2}", "boxed") == (24, 25)
    assert set(DEFAULT_PATTERNS) <= set(KEY_PATTERNS)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(text=b"bytes"), TypeError, "text"),
        (dict(patterns="nope"), ValueError, "patterns: unknown key pattern 'nope'"),
        (dict(patterns=[]), ValueError, "patterns"),
        (dict(patterns=[3]), TypeError, "patterns"),
        (dict(patterns={"boxed"}), TypeError, "patterns"),
        (dict(patterns=lambda t: [0, 1]), TypeError, "patterns: callable"),
        (dict(patterns=lambda t: (5, 99)), ValueError, "patterns: callable"),
        (dict(patterns=lambda t: (2, 2)), ValueError, "patterns: callable"),
        (dict(occurrence="middle"), ValueError, "occurrence"),
    ],
)
def test_find_key_span_validation(kwargs, error, match):
    kwargs = {"text": "some text", **kwargs}
    with pytest.raises(error, match=match):
        find_key_span(**kwargs)


def test_spans_to_token_mask():
    offsets = [(0, 0), (0, 3), (3, 5), (5, 9), (9, 9)]
    assert spans_to_token_mask(offsets, [(4, 6)]) == [False, False, True, True, False]
    assert spans_to_token_mask(offsets, [(0, 3), (9, 10)]) == [False, True, False, False, False]
    assert spans_to_token_mask(offsets, []) == [False] * 5


# ---------------------------------------------------------------- token alignment and weights

PROMPT = "Question: what is 12 + 30?\n"
RESPONSE = "<Thinking>first compute 12 + 30 = 42. 所以</Thinking><Answer>42</Answer>"


def test_stage1_prompt_response(tok):
    f = encode_example(tok, RESPONSE, PROMPT, stage=1)
    ids, labels, w = f["input_ids"], f["labels"], f["token_weights"]
    assert len(ids) == len(labels) == len(w) == len(f["attention_mask"])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    n_prompt = len(tok(PROMPT, add_special_tokens=False)["input_ids"]) + 1
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and w[:n_prompt] == [0.0] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and w[n_prompt:] == [1.0] * (len(ids) - n_prompt)
    assert _key_text(tok, f) == RESPONSE + "</s>"


def test_stage2_key_tokens_only(tok):
    report = KeySpanReport()
    f = encode_example(tok, RESPONSE, PROMPT, report=report)
    assert "42" in _key_text(tok, f) and "compute" not in _key_text(tok, f)
    assert f["input_ids"] == encode_example(tok, RESPONSE, PROMPT, stage=1)["input_ids"]  # context kept
    assert all((lab == IGNORE_INDEX) == (wt == 0.0) for lab, wt in zip(f["labels"], f["token_weights"]))
    assert f["labels"][-1] == tok.eos_token_id and f["token_weights"][-1] == 1.0  # EOS trained: stage 2 still stops
    assert report == KeySpanReport(examples=1, with_key=1, by_pattern={"answer_tag": 1})
    no_eos = encode_example(tok, RESPONSE, PROMPT, include_eos=False)
    assert no_eos["labels"][-1] == IGNORE_INDEX and _key_text(tok, no_eos).strip() == "42"


def test_include_tags_and_eos(tok):
    f = encode_example(tok, RESPONSE, PROMPT, include_tags=True, include_eos=True)
    assert _key_text(tok, f).endswith("<Answer>42</Answer></s>")
    assert "Thinking" not in _key_text(tok, f)
    assert f["token_weights"][-1] == 1.0 and f["labels"][-1] == tok.eos_token_id


def test_blend_weights(tok):
    f = encode_example(tok, RESPONSE, PROMPT, cot_weight=0.25, key_weight=2.0)
    stage1 = encode_example(tok, RESPONSE, PROMPT, stage=1)
    key = encode_example(tok, RESPONSE, PROMPT)
    for w, w1, wk, lab in zip(f["token_weights"], stage1["token_weights"], key["token_weights"], f["labels"]):
        assert w == (2.0 if wk else 0.25 if w1 else 0.0)
        assert (lab == IGNORE_INDEX) == (w == 0.0)


@pytest.mark.parametrize(
    "response, answer",
    [
        ("首先计算 7 × 6 = 42，答案是 四十二。", "四十二"),
        ("so we add them: $\\boxed{\\frac{7}{12}}$", "\\frac{7}{12}"),
        ("compute 99 + 1 then\n#### 100", "100"),
        ("then multiply. The answer is 3.5.", "3.5"),
    ],
)
def test_decoded_key_tokens_contain_answer(tok, response, answer):
    f = encode_example(tok, response, "Q: ?\n", include_eos=False)
    key = _key_text(tok, f)
    assert answer in key and len(key) < len(answer) + 6  # overlapping tokens may add a char or two


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12 + 30? The answer is"}]
    f1 = encode_example(tok, RESPONSE, messages=messages, stage=1)
    text = tok.decode(f1["input_ids"])
    assert text == tok.apply_chat_template(messages + [{"role": "assistant", "content": RESPONSE}], tokenize=False)
    assert _key_text(tok, f1) == RESPONSE + "<|im_end|>"  # not the trailing newline, not the user turn
    f2 = encode_example(tok, RESPONSE, messages=messages, include_eos=True)
    assert _key_text(tok, f2) == "42<|im_end|>"


def test_chat_template_that_trims(tok):
    tok2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="</s>", bos_token="<s>")
    tok2.chat_template = TRIMMING
    f = encode_example(tok2, "  think \\boxed{7}  \n", messages=[{"role": "user", "content": "q"}], stage=1)
    assert _key_text(tok2, f) == "think \\boxed{7}</s>"  # trimmed; the space before it is the template's
    assert "7</s>" == _key_text(tok2, encode_example(tok2, "think \\boxed{7}", messages=[])).strip()


def test_chat_template_must_render_response(tok):
    tok2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    tok2.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="messages"):
        encode_example(tok2, "the answer is x", messages=[{"role": "user", "content": "q"}])


def test_truncation(tok):
    full = encode_example(tok, RESPONSE, PROMPT)
    key_pos = [i for i, w in enumerate(full["token_weights"]) if w > 0]
    report = KeySpanReport()
    # EOS cut only: key intact, nothing reported
    f = encode_example(tok, RESPONSE, PROMPT, max_length=len(full["input_ids"]) - 1, report=report)
    assert f["token_weights"] == full["token_weights"][:-1] and report.truncated == 0
    # whole key cut: reported, then dropped by the no-key policy
    assert encode_example(tok, RESPONSE, PROMPT, max_length=key_pos[0], report=report) is None
    assert (report.truncated, report.dropped, report.with_key) == (1, 1, 2)
    # whole key cut, stage 1: reported, kept
    f = encode_example(tok, RESPONSE, PROMPT, stage=1, max_length=key_pos[0], report=report)
    assert len(f["input_ids"]) == key_pos[0] and report.truncated == 2 and report.dropped == 1
    # key cut in the middle of a longer answer: reported, the remaining key tokens kept
    long = RESPONSE.replace(">42<", ">12 + 30 = 42 所以 42<")
    full = encode_example(tok, long, PROMPT)
    key_pos = [i for i, w in enumerate(full["token_weights"]) if w > 0]
    f = encode_example(tok, long, PROMPT, max_length=key_pos[2], report=report)
    assert sum(w > 0 for w in f["token_weights"]) == 2 and report.truncated == 3


def test_no_key_policies(tok):
    report = KeySpanReport()
    assert encode_example(tok, "no idea, sorry", PROMPT, report=report) is None
    f = encode_example(tok, "no idea, sorry", PROMPT, no_key="zero", report=report)
    assert set(f["labels"]) == {IGNORE_INDEX} and set(f["token_weights"]) == {0.0}
    f = encode_example(tok, "no idea, sorry", PROMPT, stage=1, report=report)  # stage 1 needs no key
    assert f["token_weights"].count(1.0) > 0
    assert report == KeySpanReport(examples=3, without_key=3, dropped=1, zeroed=1)
    assert report.kept == 2


def test_build_features_report_and_collation(tok):
    from sftkey.methods.data import TokenWeightCollator

    examples = [
        {"prompt": PROMPT, "response": RESPONSE},
        {"prompt": "Q: 3 + 4?\n", "response": "3 + 4 = 7. The answer is 7."},
        {"messages": [{"role": "user", "content": "x?"}], "response": "so \\boxed{\\frac{1}{2}}"},
        {"response": "I give up."},
        {"response": "#### 5"},
    ]
    with pytest.warns(UserWarning, match=r"1 of 5 examples .* dropped .* examples\[3\], ends 'I give up\.'"):
        feats, report = build_features(tok, examples, no_key="drop", max_length=64)
    assert len(feats) == report.kept == 4
    assert (report.examples, report.with_key, report.without_key, report.dropped) == (5, 4, 1, 1)
    assert report.by_pattern == {"answer_tag": 1, "the_answer_is": 1, "boxed": 1, "gsm8k": 1}
    batch = TokenWeightCollator.from_tokenizer(tok)(feats)
    assert batch["labels"].shape == batch["token_weights"].shape == batch["input_ids"].shape
    assert ((batch["labels"] == IGNORE_INDEX) == (batch["token_weights"] == 0)).all()


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((None, "r"), {}, TypeError, "tokenizer"),
        (("tok", 5), {}, TypeError, "response"),
        (("tok", "r", 5), {}, TypeError, "prompt"),
        (("tok", "r", "p"), dict(messages=[]), ValueError, "prompt, messages"),
        (("tok", "r"), dict(messages="hi"), TypeError, "messages"),
        (("tok", "r"), dict(stage=3), ValueError, "stage"),
        (("tok", "r"), dict(no_key="skip"), ValueError, "no_key"),
        (("tok", "r"), dict(occurrence=-1), ValueError, "occurrence"),
        (("tok", "r"), dict(cot_weight=-0.5), ValueError, "cot_weight"),
        (("tok", "r"), dict(key_weight=float("nan")), ValueError, "key_weight"),
        (("tok", "r"), dict(key_weight="1"), TypeError, "key_weight"),
        (("tok", "r"), dict(cot_weight=True), TypeError, "cot_weight"),
        (("tok", "r"), dict(key_weight=0), ValueError, "both are 0"),
        (("tok", "r"), dict(max_length=0), ValueError, "max_length"),
        (("tok", "r"), dict(max_length=8.0), TypeError, "max_length"),
        (("tok", "r"), dict(report={}), TypeError, "report"),
        (("tok", "r"), dict(patterns="???"), ValueError, "patterns"),
    ],
)
def test_encode_example_validation(tok, args, kwargs, error, match):
    args = tuple(tok if a == "tok" else a for a in args)
    with pytest.raises(error, match=match):
        encode_example(*args, **kwargs)


def test_build_features_validation(tok):
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        build_features(tok, [{"response": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"examples\[0\]: unexpected keys \['id'\]"):
        build_features(tok, [{"response": "a", "id": 3}])
    with pytest.raises(TypeError, match="report"):
        build_features(tok, [], report=KeySpanReport())


# ---------------------------------------------------------------- issue 25: no silent drops, separators, TRL rows

@pytest.mark.parametrize("text, key", [
    ("3 + 5 = 8 . #### 8", "8"),                 # inline, as a decode without newlines writes it
    ("so 8 #### 8\n#### 9", "9"),                # the last of inline and line-start keys
    ("compute 99 + 1 then\n#### 100", "100"),    # the line-start form
])
def test_gsm8k_key_inline_and_at_line_start(text, key):
    span = find_key_span(text, "gsm8k")
    assert span is not None and text[span[0]:span[1]] == key
    assert find_key_span("a####8", "gsm8k") is None          # #### inside a word is no marker


def test_inline_gsm8k_keys_are_kept(tok):
    examples = [{"prompt": f"Q : {a} + 5 ?\n", "response": f"{a} + 5 = {a + 5} . #### {a + 5}"} for a in range(8)]
    feats, report = build_features(tok, examples, stage=2)
    assert len(feats) == 8 and report.with_key == 8 and report.dropped == 0
    assert _key_text(tok, feats[3]).replace("</s>", "").strip() == "8"


def test_build_features_raises_when_it_drops_everything(tok):
    with pytest.raises(ValueError, match=r"every example was dropped.*2 of 2 examples.*examples\[0\]"):
        build_features(tok, [{"prompt": "Q\n", "response": "no idea"}, {"response": "none either"}], stage=2)
    with pytest.warns(UserWarning, match="1 of 2"):
        feats, _ = build_features(tok, [{"response": "no idea"}, {"response": "#### 5"}])
    assert len(feats) == 1


def test_prompt_and_response_are_tokenized_apart(tok):
    """A token across the boundary ("the" + "n" -> "then") would be labelled as response: the
    two parts are tokenized separately, as generation sees them."""
    prompt, response = "so we add the", "n multiply. The answer is 5."
    def count(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    assert count(prompt + response) < count(prompt) + count(response)
    f = encode_example(tok, response, prompt, stage=1)
    head = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    assert f["input_ids"] == head + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert _key_text(tok, f) == response + "</s>"
    assert f["labels"][:len(head)] == [IGNORE_INDEX] * len(head)


def test_trl_rows(tok):
    user = [{"role": "user", "content": "12 + 30?"}]
    assistant = [{"role": "assistant", "content": RESPONSE}]
    ours = build_features(tok, [{"prompt": PROMPT, "response": RESPONSE}, {"messages": user, "response": RESPONSE}])[0]
    trl = build_features(tok, [{"prompt": PROMPT, "completion": RESPONSE},
                               {"prompt": user, "completion": assistant}])[0]
    assert trl == ours
    assert build_features(tok, [{"messages": user + assistant}])[0] == ours[1:]
    for bad, match in (({"messages": user}, "ending with the assistant"),
                       ({"prompt": user, "completion": assistant * 2}, "one assistant message"),
                       ({"prompt": "q", "completion": "a", "extra": 1}, r"unexpected keys \['extra'\]")):
        with pytest.raises(ValueError, match=match):
            build_features(tok, [bad])
