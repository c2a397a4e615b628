"""Answer extraction and grading on crafted completions (pure functions, no model)."""

import pytest

from eval import extract, grading
from eval.backends import truncate_at_stop
from eval.tasks import TASKS, Sample
from pipeline.prompts import metamath_prompt

# From MetaMath's eval_gsm8k.py / eval_math.py (github.com/meta-math/MetaMath), copied by hand.
METAMATH_EVAL_STOP = ["Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT", "Instruction:",
                      "Instruction", "Response:", "Response"]


@pytest.mark.parametrize("completion, strict", [
    ("So she has 5 - 8 = -3.\nThe answer is: -3", -3),
    ("The answer is: 1,234", 1234),
    ("The answer is: $12.50", 12),          # MetaMath rounds to an integer (round half to even)
    ("The answer is: 3/4", 1),               # a/b is evaluated, then rounded
    ("The answer is: 18.", 18),              # trailing period
    ("The answer is: 7 apples", 7),
    ("The answer is: 5\nThe answer is: 6", 6),  # the last one counts
    ("She has 18 eggs.", None),              # no 'The answer is: '
    ("The answer is: none", None),           # prefix but no number
    ("The answer is: 1,234,567", 1234),      # MetaMath's regex reads one comma group only
    ("The answer is: 5/0", 5),               # MetaMath: a/0 gives the numerator
])
def test_gsm8k_strict_matches_metamath(completion, strict):
    assert extract.metamath_number(completion) == strict


@pytest.mark.parametrize("completion, flexible", [
    ("5 - 8 = -3", -3.0),
    ("That costs $1,234,567 in total.", 1234567.0),
    ("He pays $12.50.", 12.5),
    ("3/4 of the cake", 0.75),
    ("The answer is: 18.", 18.0),
    ("first 3 then 4, so 7", 7.0),
    ("no digits here", None),
])
def test_gsm8k_flexible_last_number(completion, flexible):
    assert extract.last_number(completion) == flexible


def test_gsm8k_score_counts_invalid_and_both_metrics():
    task = TASKS["gsm8k"]
    sample = Sample(id="0", question="q", gold=18)
    assert task.score(sample, "9 * 2 = 18\nThe answer is: 18")["strict"] == 1
    s = task.score(sample, "9 * 2 = 18")  # right number, no MetaMath answer line
    assert (s["strict"], s["flexible"], s["invalid"]) == (0, 1, 1)
    s = task.score(sample, "The answer is: 18. Then 20 more")
    assert (s["strict"], s["flexible"]) == (1, 0)


def test_gsm8k_gold_parsing():
    assert extract.gsm8k_gold("blah\n#### 1,450,000") == 1450000
    assert extract.gsm8k_gold("#### -4") == -4
    with pytest.raises(ValueError):
        extract.gsm8k_gold("no marker 18")


@pytest.mark.parametrize("text, boxed", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{x^{2}+{1}}", r"x^{2}+{1}"),
    (r"\boxed 5$.", "5"),
    (r"\fbox{7}", "7"),
    (r"\boxed{unclosed", None),
    ("nothing", None),
])
def test_last_boxed_matches_braces(text, boxed):
    assert extract.last_boxed(text) == boxed


def test_math_prediction_prefers_the_answer_line():
    assert extract.math_prediction("so \\boxed{3}.\nThe answer is: \\frac{1}{2}.\n") == r"\frac{1}{2}"
    assert extract.math_prediction("so \\boxed{3}.") == "3"
    assert extract.math_prediction("The answer is: 4.") == "4"  # MetaMath drops one trailing period
    assert extract.math_prediction("no answer") is None


@pytest.mark.parametrize("pred, gold, strict, verify", [
    ("0.5", r"\frac{1}{2}", True, True),
    ("1/2", r"\frac12", True, True),
    (r"\dfrac{3}{4}", r"\frac{3}{4}", True, True),
    ("x = 5", "5", True, True),
    (r"90^\circ", "90", True, True),
    (r"10\%", "10", True, True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True, True),
    ("2+3i", "3i+2", False, True),           # same number, different order: only math-verify sees it
    (r"\frac{2}{4}", r"\frac{1}{2}", False, True),
    ("7", "8", False, False),
    (None, "8", False, False),
])
def test_math_strict_and_math_verify(pred, gold, strict, verify):
    assert grading.strict_equal(pred, gold) is strict
    assert grading.math_verify_equal(pred, gold) is verify


def test_math_score_fields():
    s = TASKS["math"].score(Sample(id="a", question="q", gold=r"\frac{1}{2}", subject="Algebra", level=2),
                            "Half.\nThe answer is: 1/2")
    assert (s["pred"], s["strict"], s["math_verify"], s["invalid"]) == ("1/2", 1, 1, 0)


def test_prompt_is_metamath_alpaca():
    p = TASKS["gsm8k"].prompt(Sample(id="0", question="What is 2+2?", gold=4))
    assert p == metamath_prompt("What is 2+2?")
    assert p.endswith("### Instruction:\nWhat is 2+2?\n\n### Response: Let's think step by step.")


def test_truncate_at_first_stop_string():
    stop = ["Instruction", "Response"]
    assert truncate_at_stop("ok. The answer is: 4\n\n### Response and ### Instruction", stop) == \
        "ok. The answer is: 4\n\n### "
    assert truncate_at_stop("no stop here", stop) == "no stop here"


def test_stop_strings_match_metamath_eval_scripts():
    assert TASKS["gsm8k"].stop == METAMATH_EVAL_STOP
    assert TASKS["math"].stop == METAMATH_EVAL_STOP


def test_documented_grader_differences_hold():
    """eval/README.md's list of differences from the published graders, pinned."""
    from eval.grading import math_verify_equal, strict_equal

    assert strict_equal("50%", "50") and strict_equal("50\\%", "50")  # MetaMath's strip_string: only the second
    assert strict_equal("\\frac1", "\\frac1") and not strict_equal("\\frac1", "\\frac2")  # exception: raw compare
    assert math_verify_equal("x / 2", "\\frac{x}{2}") and math_verify_equal("0.5", "\\frac{1}{2}")
    assert not strict_equal("0.25", "\\frac{1}{4}")  # string match stays strict
