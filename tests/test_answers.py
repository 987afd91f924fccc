"""sftkey.methods.answers: answer extraction and comparison, edge cases."""
from fractions import Fraction

import pytest

from sftkey.methods.answers import AnswerChecker, answers_match, normalize_answer, parse_number


@pytest.mark.parametrize("text, value", [
    ("1000", Fraction(1000)), ("1,000", Fraction(1000)), ("1,000,000", Fraction(10 ** 6)),
    ("-3.50", Fraction(-7, 2)), (".5", Fraction(1, 2)), ("+2", Fraction(2)), ("3/4", Fraction(3, 4)),
    (" 42. ", Fraction(42)), ("$5", Fraction(5)), ("$5$", Fraction(5)), ("7!", Fraction(7)),
    ("1,00", None), ("12,34", None), ("3/0", None), ("1e5", None), ("five", None), ("", None), ("1 000", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text, normal", [
    ("  The  Cat. ", "the cat"), ("Paris!", "paris"), ("$x^2$", "x^2"), ("A.", "a"), ("...", ""),
    ("答案。", "答案"),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize("answer, reference, same", [
    ("1,000", 1000, True), ("1000", "1,000", True), ("1000.0", 1000, True), ("72.", "72", True),
    ("0.1", 0.1, True), ("0.10", "0.1", True), ("1/2", 0.5, True), ("1/2", Fraction(1, 2), True),
    ("-0", 0, True), ("0.00001", 1e-05, True), ("100000000000000000000", 1e20, True), ("72", 73, False), ("1,00", "100", False), ("100", "1e2", False),
    ("Paris", "paris.", True), ("Paris", "Lyon", False), ("x = 3", "3", False), ("\\frac{1}{2}", "\\frac{1}{2}", True),
])
def test_answers_match(answer, reference, same):
    assert answers_match(answer, reference) is same


def test_reference_type():
    with pytest.raises(TypeError, match="reference"):
        answers_match("1", True)
    with pytest.raises(TypeError, match="reference"):
        answers_match("1", None)
    with pytest.raises(TypeError, match="text"):
        normalize_answer(3)


@pytest.mark.parametrize("response, reference, right", [
    ("<Thinking> 2 + 2 = 4 </Thinking><Answer> 4 </Answer>", 4, True),
    ("so \\boxed{1,000}.", 1000, True),
    ("work\n#### 72", "72", True),
    ("The answer is 72.", 72, True),
    ("The answer is 72. Then more text", 72, True),
    ("<Answer>3</Answer> and later <Answer>5</Answer>", 5, True),   # the last answer counts
    ("<Answer>3</Answer> and later <Answer>5</Answer>", 3, False),
    ("2 + 5 = 7 . #### 7", 7, True),                               # a decode that lost the newline
    ("2 + 5 = 7 . #### 8", 7, False),
    ("no answer here: 72", 72, None),                              # no answer: None, counted as wrong
    ("<Answer>72", 72, None),                                      # unclosed tag: no answer
    ("", 0, None),
])
def test_default_checker(response, reference, right):
    assert AnswerChecker()(response, reference) is right


def test_checker_patterns_and_occurrence():
    first = AnswerChecker("answer_tag", occurrence="first")
    assert first("<Answer>3</Answer> <Answer>5</Answer>", 3)
    assert not AnswerChecker("boxed")("The answer is 4.", 4)
    assert AnswerChecker("boxed").extract("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    with pytest.raises(ValueError, match="patterns"):
        AnswerChecker("nope")
    with pytest.raises(ValueError, match="occurrence"):
        AnswerChecker(occurrence="middle")
