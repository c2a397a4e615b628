"""Pull answers out of completions: pure functions on strings, tested on raw text."""

from __future__ import annotations

import re
from fractions import Fraction

from pipeline.prompts import ANSWER_PREFIX

# MetaMath's eval_gsm8k.py regex: one optional sign, one optional separator ('.', ',' or '/'). It reads "1,234"
# and "12.50" but stops "1,234,567" after "1,234"; kept as is so the strict score matches MetaMath's.
_METAMATH_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")
# Flexible: thousands groups, decimals and a/b fractions, read in full.
_NUMBER = re.compile(r"[\-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


def after_answer_prefix(completion: str) -> str | None:
    """The text after the last `The answer is: `, or None when the completion never says it."""
    parts = completion.split(ANSWER_PREFIX)
    return parts[-1] if len(parts) > 1 else None


def metamath_number(completion: str) -> int | None:
    """GSM8K strict answer, as MetaMath's `extract_answer_number`: the first number after the last
    `The answer is: `, commas dropped, `a/b` evaluated, rounded to an integer (round half to even, as Python's
    `round`); None when there is no prefix or no number. `a/0` gives the numerator, as MetaMath does."""
    text = after_answer_prefix(completion)
    if text is None:
        return None
    match = _METAMATH_NUMBER.search(text.strip())
    if not match:
        return None
    s = match.group()
    if "/" in s:
        num, den = s.split("/")
        if not (_is_float(num) and _is_float(den)):
            return None
        if den == "0":
            return round(float(num.replace(",", "")))
        frac = Fraction(s.replace(",", ""))
        return round(float(frac.numerator / frac.denominator))
    value = float(s.replace(",", ""))
    return None if value == float("inf") else round(value)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def last_number(completion: str) -> float | None:
    """GSM8K flexible answer: the last number anywhere in the completion (commas, decimals, `a/b`)."""
    matches = _NUMBER.findall(completion)
    if not matches:
        return None
    return parse_number(matches[-1])


def parse_number(s: str) -> float | None:
    s = s.replace(",", "").strip()
    try:
        if "/" in s:
            num, den = s.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(s)
    except ValueError:
        return None


def gsm8k_gold(answer: str) -> int | float:
    """The number after `####` in a GSM8K solution, commas removed (int when whole)."""
    if "####" not in answer:
        raise ValueError("no '####' in the answer")
    value = float(answer.split("####")[-1].strip().replace(",", ""))
    return int(value) if value.is_integer() else value


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None when absent or unclosed.
    Also reads `\\boxed 5` (no braces), which MATH solutions use a few times."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed "):
        return rest[len("\\boxed "):].split("$")[0].strip()
    open_at = rest.find("{")
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[open_at + 1:i]
    return None


def metamath_math_answer(completion: str) -> str | None:
    """MATH answer after the last `The answer is: ` cut as MetaMath's eval_math.py does: up to the first '.\\n',
    stripped, one trailing '.' removed."""
    text = after_answer_prefix(completion)
    if text is None:
        return None
    text = text.split(".\n")[0].strip()
    if text.endswith("."):
        text = text[:-1]
    return text.strip()


def math_prediction(completion: str) -> str | None:
    """MATH answer: after `The answer is: ` (MetaMath-trained models) else the last `\\boxed{}`."""
    answer = metamath_math_answer(completion)
    return answer if answer is not None else last_boxed(completion)


def first_number(text: str) -> float | None:
    """The first number in `text` read in full (sign, thousands groups, decimals, `a/b`), not rounded."""
    match = _NUMBER.search(text)
    return parse_number(match.group()) if match else None


def answer_line(completion: str) -> str | None:
    """The text after the last `The answer is: ` up to the end of its line, one trailing '.' dropped; None when the
    completion never says it. For answers that are words or times rather than numbers."""
    text = after_answer_prefix(completion)
    if text is None:
        return None
    text = text.strip().split("\n")[0].strip()
    return text[:-1].strip() if text.endswith(".") else text


# A letter ends at `)`, punctuation or the line's end: "A DNA sequence ..." is an option's text, not "A".
_LETTER_AT_START = re.compile(r"^\(?([A-E])(?=\)|[.,:;]|\s*$)")
_LETTER_AFTER_ANSWER_IS = re.compile(r"answer is:?\s*\(([A-Ea-e])\)|answer is:?\s*([A-E])(?=\)|[.,:;]|\s*$)",
                                     re.MULTILINE)


def choice_letter(completion: str) -> str | None:
    """Multiple choice, strict: the letter (A-E, optionally in parentheses) that opens the text after the last
    `The answer is: `: `B`, `(B) 16`, `B) 16`, `B.`; not `B 16`."""
    text = after_answer_prefix(completion)
    if text is None:
        return None
    match = _LETTER_AT_START.match(text.strip())
    return match.group(1) if match else None


def choice_letter_anywhere(completion: str) -> str | None:
    """Multiple choice, flexible: the last `answer is (X)` / `answer is X` anywhere (Qwen2.5-Math's reading)."""
    matches = _LETTER_AFTER_ANSWER_IS.findall(completion)
    if not matches:
        return None
    paren, bare = matches[-1]
    return (paren or bare).upper()


_NUM = r"(?:\d+\.?\d*|\.\d+)"
_TIMES_TEN = re.compile(rf"([-+]?{_NUM})(?:\\times|\\cdot|\*|x)10\^\{{?([-+]?\d+)\}}?")


def plain_number(s: str | None) -> float | None:
    """`s` as one number when it is nothing else: `12`, `-1./3`, `4.5e33`, `4.5 \\times 10^{33}`, `1,234`;
    None for anything else (an expression, a unit, words)."""
    if s is None:
        return None
    s = s.strip().strip("$").replace(" ", "").replace("\\,", "").replace("{,}", ",")
    match = _TIMES_TEN.fullmatch(s)
    if match:
        return float(match.group(1)) * 10 ** int(match.group(2))
    if re.fullmatch(rf"[-+]?(?:\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|{_NUM}(?:[eE][-+]?\d+)?)", s):
        return float(s.replace(",", ""))
    if re.fullmatch(rf"[-+]?{_NUM}/{_NUM}", s):
        return parse_number(s)
    return None
