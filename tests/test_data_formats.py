"""Alpaca rows and chat (`messages`) rows: the mapping on raw rows, the loss mask token by token under TRL with a
chat template, and a chat recipe trained and evaluated through `pipeline run` (the eval uses the chat template)."""

import json

import pytest
from helpers import data_cfg, gsm8k_rows, tiny_llama, tiny_tokenizer, write_jsonl, write_recipe

from pipeline import data
from pipeline.adapter_meta import AdapterMeta
from pipeline.cli import main as cli_main
from pipeline.data import detect_format, load_rows, load_sft_dataset, map_row, messages_examples, truncation_report
from pipeline.errors import UserError


def metamath_prompt(query: str) -> str:
    """The training prompt every non-chat format gets (whatever its text is, pipeline/prompts.py)."""
    return data.to_prompt_completion(query, "x")["prompt"]


def completion(response: str) -> str:
    return data.to_prompt_completion("q", response)["completion"]

# a minimal chat template in the usual shape (role header, content, end of turn)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

CHAT = [{"role": "system", "content": "You solve math problems."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5\nThe answer is: 5"},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "5 * 4 = 20\nThe answer is: 20"}]


def chat_tokenizer(save_dir=None):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


def test_alpaca_rows_map_to_the_project_prompt():
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5\nThe answer is: 5"}
    assert map_row(row, "alpaca", "instruction", "output") == {
        "prompt": metamath_prompt("Add the numbers.\n\n2 and 3"),
        "completion": completion("2 + 3 = 5\nThe answer is: 5")}
    for no_input in ({}, {"input": ""}, {"input": "  "}, {"input": None}):
        row = {"instruction": "Add 2 and 3.", "output": "5", **no_input}
        assert map_row(row, "alpaca", "instruction", "output")["prompt"] == metamath_prompt("Add 2 and 3.")
    with pytest.raises(ValueError, match="field 'input' is not text"):
        map_row({"instruction": "x", "input": 3, "output": "y"}, "alpaca", "instruction", "output")
    with pytest.raises(ValueError, match="field 'output' is empty"):
        map_row({"instruction": "x", "output": " "}, "alpaca", "instruction", "output")


def test_alpaca_file_with_renamed_fields(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"task": "Add 2 and 3.", "input": "", "target": "5"},
                                              {"task": "Double it.", "input": "5", "target": "10"},
                                              {"task": "broken"}])
    ds, stats = load_rows(str(path), "train", "alpaca", query_field="task", response_field="target")
    assert stats["format"] == "alpaca" and (stats["kept"], stats["malformed"]) == (2, 1)
    assert "line 3: field 'target' is missing" in stats["malformed_examples"][0]
    assert ds[1]["prompt"] == metamath_prompt("Double it.\n\n5") and ds[1]["completion"] == completion("10")
    assert detect_format({"instruction", "input", "output"}) == "alpaca"
    assert detect_format({"messages"}) == "messages"


def test_messages_become_one_example_per_assistant_turn():
    examples = messages_examples(CHAT)
    assert [e["prompt"] for e in examples] == [CHAT[:2], CHAT[:4]]
    assert [e["completion"] for e in examples] == [[CHAT[2]], [CHAT[4]]]
    bad = [([], "not a non-empty list"), ([{"role": "user", "content": "q"}], "no assistant turn after a user"),
           ([{"role": "assistant", "content": "a"}], "no assistant turn after a user"),
           ([{"role": "bot", "content": "a"}], "role 'bot' is not one of system, user, assistant"),
           ([{"role": "user", "content": " "}], "turn 1 (user) is empty"),
           ([{"from": "human", "value": "q"}], "turn 1 is not {'role': ..., 'content': text}")]
    for turns, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            messages_examples(turns)


def test_messages_loss_is_on_the_assistant_turns_token_by_token(tmp_path):
    from trl import SFTConfig

    from pipeline.edora import EdoraConfig
    from pipeline.trainer import make_trainer

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    train_ds, _, stats = load_sft_dataset(data_cfg(source=str(path), format="messages"), 0)
    assert stats["train"]["format"] == "messages" and len(train_ds) == 3  # 2 + 1 assistant turns
    tok = chat_tokenizer()
    report = truncation_report(train_ds, tok, 512)
    assert report["rows"] == 3 and report["truncated"] == 0
    args = SFTConfig(output_dir=str(tmp_path / "o"), use_cpu=True, max_length=512, completion_only_loss=True,
                     report_to="none", per_device_train_batch_size=3)
    trainer = make_trainer(tiny_llama(vocab=300), args, train_ds, None, tok,
                           EdoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    for i in range(3):
        raw = train_ds[i]
        prompt_text = tok.apply_chat_template(raw["prompt"], tokenize=False, add_generation_prompt=True)
        full_text = tok.apply_chat_template(raw["prompt"] + raw["completion"], tokenize=False)
        full_ids = tok(full_text).input_ids
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        assert ids[:len(full_ids)].tolist() == full_ids
        trained = [t for t in labels.tolist() if t != -100]
        # the loss covers exactly this assistant turn (content + end of turn), never the earlier turns
        assert tok.decode(trained) == full_text[len(prompt_text):] == raw["completion"][0]["content"] + "<eos>\n"


def test_chat_recipe_needs_a_chat_template(tmp_path, capsys):
    root = tmp_path / "setup"
    tiny_llama(vocab=300).save_pretrained(root / "model")
    tiny_tokenizer(root / "model")  # no chat template
    write_jsonl(root / "gsm8k.jsonl", [{"messages": CHAT}] * 4)
    recipe = write_recipe(root, "nochat", tmp_path, data={"format": "messages"}, training={"max_steps": 1})
    assert cli_main(["train", str(recipe)]) == 2
    assert "data.format messages needs a chat template" in capsys.readouterr().err
    with pytest.raises(UserError, match="drop data.response_field"):
        from pipeline.recipe import load_recipe

        load_recipe(recipe, ["--data.response_field=x"])


@pytest.mark.slow  # ~20 s: train, merge and eval on CPU
def test_chat_recipe_trains_and_evaluates_with_the_chat_template_through_run(tmp_path):
    root = tmp_path / "setup"
    tiny_llama(seed=0, vocab=300).save_pretrained(root / "model")
    chat_tokenizer(root / "model")
    rows = gsm8k_rows(24)
    write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": r["question"]},
                                                    {"role": "assistant", "content": r["answer"]}]} for r in rows])
    write_jsonl(root / "gsm8k.jsonl", rows)
    recipe = write_recipe(root, "chat", tmp_path, data={"source": str(root / "chat.jsonl"), "format": "messages"},
                          training={"max_steps": 3})
    assert cli_main(["run", str(recipe), "--backend", "hf", "--tasks", "gsm8k", "--limit", "2", "--max-tokens", "8",
                     "--merge-dtype", "float32", "--data-file", f"gsm8k={root / 'gsm8k.jsonl'}"]) == 0
    run = tmp_path / "runs" / "chat"
    assert AdapterMeta.read(run / "adapter").prompt_format == "chat"
    assert json.loads((run / "data_stats.json").read_text())["train"]["format"] == "messages"
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["prompt"] == "chat template: " + CHAT_TEMPLATE and summary["tasks"]["gsm8k"]["n"] == 2
    assert json.loads((run / "eval" / "run.json").read_text())["tasks"]["gsm8k"]["prompt"] == summary["prompt"]
    from eval.prompting import trained_prompt_format

    assert trained_prompt_format(str(run / "merged")) == "chat"  # a later `eval --model runs/chat/merged`


def test_eval_prompt_follows_the_recorded_training_format(tmp_path):
    from eval.prompting import trained_prompt_format

    run = tmp_path / "runs" / "x"
    (run / "merged").mkdir(parents=True)
    assert trained_prompt_format(str(run / "merged")) is None  # nothing recorded: eval's default (metamath)
    (run / "data_stats.json").write_text(json.dumps({"train": {"format": ["gsm8k", "messages"]}}))
    assert trained_prompt_format(str(run / "merged")) == "chat"  # a full fine-tune: no adapter, data_stats.json
    (run / "adapter").mkdir()
    AdapterMeta(prompt_format="metamath").write(run / "adapter")
    assert trained_prompt_format(str(run / "merged")) == "metamath"  # the adapter's record comes first
    assert trained_prompt_format("HuggingFaceTB/SmolLM2-135M") is None
