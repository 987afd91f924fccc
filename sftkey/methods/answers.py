"""Final-answer checking: extract a response's answer with :mod:`sftkey.methods.keys`' patterns and
compare it with a reference, as numbers where both parse, else as normalized strings."""
from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from numbers import Real
from typing import Optional, Sequence, Union

from . import keys

Reference = Union[str, int, float, Fraction]

_DECIMAL = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_RATIO = re.compile(r"[+-]?\d+/[1-9]\d*")
_TRAILING = ".。!！?？;；"


def normalize_answer(text: str) -> str:
    """``text`` without surrounding whitespace, ``$``, trailing sentence punctuation, and
    with runs of whitespace as one space, case-folded: ``" The Cat. "`` -> ``"the cat"``."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    t = " ".join(text.split())
    while t and (t[-1] in _TRAILING or t[0] == "$" or t[-1] == "$"):
        t = (t[:-1] if t[-1] in _TRAILING or t[-1] == "$" else t[1:]).strip()
    return t.casefold()


def parse_number(text: str) -> Optional[Fraction]:
    """The exact value of a normalized answer that is a number (``"1,000"``, ``"-3.50"``,
    ``".5"``, ``"3/4"``), else None. Thousands separators must be well placed (``"1,00"`` is
    no number)."""
    t = normalize_answer(text)
    if _DECIMAL.fullmatch(t) or _RATIO.fullmatch(t):
        return Fraction(t.replace(",", ""))
    return None


def _reference_text(reference: Reference) -> str:
    if isinstance(reference, bool) or not isinstance(reference, (str, Real, Fraction)):
        raise TypeError(f"reference: expected str, int, float or Fraction, got {type(reference).__name__}")
    if isinstance(reference, Fraction):
        return str(reference)
    if isinstance(reference, float):  # positional, not 1e-05: the shortest repr's digits
        return format(Decimal(repr(reference)), "f")
    return reference if isinstance(reference, str) else repr(reference)


def answers_match(answer: str, reference: Reference) -> bool:
    """Whether ``answer`` (extracted text) equals ``reference``: as numbers where both parse
    (``"1,000"`` == ``1000`` == ``"1000.0"``), else as :func:`normalize_answer` strings."""
    ref = _reference_text(reference)
    a, b = parse_number(answer), parse_number(ref)
    if a is not None and b is not None:
        return a == b
    return normalize_answer(answer) == normalize_answer(ref)


class AnswerChecker:
    """``checker(response, reference) -> bool | None``: whether the response's key answer
    (:func:`sftkey.methods.keys.find_key_span` with ``patterns`` and ``occurrence``) matches
    ``reference`` by :func:`answers_match`; None (falsy: wrong) when the response has no answer,
    so that a search can count the responses it could not check."""

    def __init__(self, patterns: Union[keys.KeyPattern, Sequence[keys.KeyPattern]] = keys.DEFAULT_PATTERNS,
                 occurrence: str = "last"):
        keys.find_key_span("", patterns, occurrence=occurrence)  # checks both arguments
        self.patterns, self.occurrence = patterns, occurrence

    def extract(self, response: str) -> Optional[str]:
        """The key answer text of ``response``, or None."""
        span = keys.find_key_span(response, self.patterns, occurrence=self.occurrence)
        return None if span is None else response[span[0]:span[1]]

    def __call__(self, response: str, reference: Reference) -> Optional[bool]:
        answer = self.extract(response)
        return None if answer is None else answers_match(answer, reference)
