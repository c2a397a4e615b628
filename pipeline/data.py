"""Training data: MetaMathQA, GSM8K or MATH rows -> a prompt/completion dataset for TRL's SFTTrainer.

Each row becomes `prompt` = the MetaMath Alpaca training prompt (ending `### Response:`, as MetaMath's and LoRA-XS's
training code write it) and `completion` = the worked solution, whose last line is `The answer is: <answer>`, right
after it. SFTTrainer appends EOS and computes the loss on the completion only (MetaMath: target = response + EOS).
`Let's think step by step.` belongs to the eval prompt only. Rows with missing or empty fields are dropped, counted
and reported with their line numbers; never silently. Several sources are read in turn and concatenated.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.prompts import ANSWER_PREFIX, metamath_train_prompt
from pipeline.specs import LOCAL_SUFFIXES, Split, parse_split  # noqa: F401 - Split, parse_split: re-exported

if TYPE_CHECKING:
    from pipeline.recipe_schema import DataConfig

logger = logging.getLogger(__name__)

FIELDS = {"metamathqa": ("query", "response"), "gsm8k": ("question", "answer"), "math": ("problem", "solution"),
          "alpaca": ("instruction", "output"), "messages": ("messages", None)}
CHAT_ROLES = ("system", "user", "assistant")
MAX_EXAMPLES = 5  # malformed rows named in logs and stats
_CALC = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: 48/2 = <<48/2=24>>24


# ---------------------------------------------------------------------------------------------------------------
# Row mapping (pure functions on strings)


def gsm8k_solution(answer: str) -> str:
    """GSM8K's worked answer -> MetaMath style: calculator annotations removed, `#### N` -> `The answer is: N`."""
    body, sep, final = answer.rpartition("####")
    final = final.strip()
    if not sep or not final:
        raise ValueError("answer has no final '#### N' line")
    body = _CALC.sub("", body).strip()
    return f"{body}\n{ANSWER_PREFIX}{final}" if body else f"{ANSWER_PREFIX}{final}"


def math_solution(solution: str) -> str:
    """A MATH solution -> MetaMath style: the solution, then `The answer is: X` with X the last boxed answer (as
    MetaMathQA's MATH_AnsAug rows end)."""
    from eval.extract import last_boxed  # the eval's MATH gold extraction: one definition

    answer = (last_boxed(solution) or "").strip()
    if not answer:
        raise ValueError("solution has no \\boxed{...} answer")
    return f"{solution.strip()}\n{ANSWER_PREFIX}{answer}"


def to_prompt_completion(query: str, response: str) -> dict:
    # MetaMath's training text is exactly header.format(query) + response + EOS: no separator, nothing stripped.
    return {"prompt": metamath_train_prompt(query), "completion": response}


def alpaca_query(instruction: str, input_text) -> str:
    """Alpaca's instruction and optional input as one instruction (the input follows after a blank line)."""
    if input_text is not None and not isinstance(input_text, str):
        raise ValueError(f"field 'input' is not text: {str(input_text)[:40]!r}")
    extra = (input_text or "").strip()
    return f"{instruction.strip()}\n\n{extra}" if extra else instruction.strip()


def messages_examples(turns, field: str = "messages") -> list[dict]:
    """A conversation -> one conversational prompt/completion example per assistant turn (prompt = every turn before
    it), so the loss covers each assistant turn and nothing else; the model's chat template renders them."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field '{field}' is not a non-empty list of turns")
    clean = []
    for i, turn in enumerate(turns, 1):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise ValueError(f"{field} turn {i} is not {{'role': ..., 'content': text}}: {str(turn)[:60]!r}")
        if turn["role"] not in CHAT_ROLES:
            raise ValueError(f"{field} turn {i}: role {turn['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        if not turn["content"].strip():
            raise ValueError(f"{field} turn {i} ({turn['role']}) is empty")
        clean.append({"role": turn["role"], "content": turn["content"]})
    out = [{"prompt": clean[:i], "completion": [t]} for i, t in enumerate(clean)
           if t["role"] == "assistant" and any(p["role"] == "user" for p in clean[:i])]
    if not out:
        raise ValueError(f"{field} has no assistant turn after a user turn")
    return out


def map_row(row, fmt: str, query_field: str, response_field: str) -> dict | list[dict]:
    """One raw row -> {prompt, completion} (a list of them for a conversation); ValueError naming what is wrong for
    a malformed row."""
    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object: {str(row)[:60]!r}")
    if fmt == "messages":
        if query_field not in row:
            raise ValueError(f"field '{query_field}' is missing")
        return messages_examples(row[query_field], query_field)
    for key in (query_field, response_field):
        value = row[key] if key in row else None
        if value is None:
            raise ValueError(f"field '{key}' is missing")
        if not isinstance(value, str):
            raise ValueError(f"field '{key}' is not text: {str(value)[:40]!r}")
        if not value.strip():
            raise ValueError(f"field '{key}' is empty")
    query, response = row[query_field], row[response_field]
    if fmt == "gsm8k":
        query, response = query.strip(), gsm8k_solution(response)
    elif fmt == "math":
        query, response = query.strip(), math_solution(response)
    elif fmt == "alpaca":
        query = alpaca_query(query, row.get("input"))
    return to_prompt_completion(query, response)


def detect_format(columns) -> str:
    columns = set(columns)
    for fmt, fields in FIELDS.items():
        if {f for f in fields if f} <= columns:
            return fmt
    raise UserError(f"cannot tell the data format: {field_hint(columns)}")


def field_hint(columns, fmt: str | None = None) -> str:
    """What to set when a file's fields are not the format's: names the file's fields and the recipe keys."""
    reads = f"data.format {fmt} reads {'/'.join(FIELDS[fmt])}" if fmt in FIELDS else \
        ("MetaMathQA rows have query/response, GSM8K rows question/answer, MATH rows problem/solution, Alpaca rows "
         "instruction/output (+ input), chat rows messages")
    return (f"the rows have the fields {sorted(columns)} and {reads}. Set data.format (metamathqa: the solution ends "
            f"with 'The answer is: N'; gsm8k: it ends with '#### N'; math: a final \\boxed{{}}; alpaca; messages) "
            f"and name your fields: --data.query_field=<the question's field> "
            f"--data.response_field=<the solution's field>")


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _read_rows(source: str, split: Split) -> tuple[list[tuple[str, object]], str]:
    """Rows of one split slice as (where, row) pairs, `where` naming the line/row for reports."""
    suffix = Path(source).suffix
    if suffix in LOCAL_SUFFIXES:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"data file {source} not found")
        if suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            rows = _read_json(path)
        start, stop = split.bounds(len(rows))
        return rows[start:stop], str(path)
    from datasets import load_dataset  # hub id: downloads on first use

    ds = load_dataset(source, split=split.name)
    start, stop = split.bounds(len(ds))
    ds = ds.select(range(start, stop))
    return [(f"row {start + i + 1}", r) for i, r in enumerate(ds.to_list())], source


def _read_parquet(path: Path) -> list[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError variants for a non-Parquet file
        raise UserError(f"{path} is not a Parquet file ({str(e)[:100]}); convert it, or rename a JSON Lines file to "
                        ".jsonl") from None
    return [(f"row {i + 1}", r) for i, r in enumerate(table.to_pylist())]


def _read_json(path: Path) -> list[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text (line {line}: {e.reason}); re-save it as UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"item {i + 1}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError:
            rows.append((f"line {n}", f"<invalid JSON: {line[:40]}>"))  # reported as malformed by map_row
    return rows


def load_rows(source: str | list[str], split: str, fmt: str = "auto", query_field: str | None = None,
              response_field: str | None = None):
    """Read, slice and map one split -> (datasets.Dataset with prompt/completion, stats dict). A list of sources is
    read in turn (each with `split`; `auto` detects each one's format) and concatenated in that order."""
    from datasets import Dataset

    if isinstance(source, str):
        mapped, stats = _load_mapped(source, split, fmt, query_field, response_field)
        return Dataset.from_list(mapped), stats
    mapped, parts = [], []
    for one in source:
        rows, stats = _load_mapped(one, split, fmt, query_field, response_field)
        mapped += rows
        parts.append(stats)
    if len({p["format"] == "messages" for p in parts}) > 1:
        raise UserError(f"data.source {source}: chat files (format messages) cannot be mixed with prompt/response "
                        "files in one run; convert them to one kind")
    stats = {"source": [p["source"] for p in parts], "split": split, "format": [p["format"] for p in parts],
             **{k: sum(p[k] for p in parts) for k in ("rows", "kept", "malformed")},
             "malformed_examples": [e for p in parts for e in p["malformed_examples"]][:MAX_EXAMPLES],
             "by_type": {k: v for p in parts for k, v in p["by_type"].items()}, "parts": parts}
    return Dataset.from_list(mapped), stats


def _load_mapped(source: str, split: str, fmt: str, query_field: str | None, response_field: str | None):
    rows, where = _read_rows(source, parse_split(split))
    if not rows:
        raise UserError(f"{where} split {split!r} has no rows")
    if fmt == "auto":
        fmt = detect_format({k for _, r in rows[:100] if isinstance(r, dict) for k in r})
    q_field, r_field = query_field or FIELDS[fmt][0], response_field or FIELDS[fmt][1]
    mapped, malformed, types = [], [], Counter()
    for loc, row in rows:
        try:
            example = map_row(row, fmt, q_field, r_field)
            mapped.extend(example if isinstance(example, list) else [example])
        except ValueError as e:
            malformed.append(f"{loc}: {e}")
            continue
        if "type" in row:
            types[str(row["type"])] += 1
    stats = {"source": where, "split": split, "format": fmt, "rows": len(rows), "kept": len(mapped),
             "malformed": len(malformed), "malformed_examples": malformed[:MAX_EXAMPLES], "by_type": dict(types)}
    if malformed:
        logger.warning("%s %s: dropped %d of %d rows as malformed, e.g. %s", where, split, len(malformed), len(rows),
                       "; ".join(malformed[:MAX_EXAMPLES]))
    if not mapped:
        columns = {k for _, r in rows[:100] if isinstance(r, dict) for k in r}
        hint = f"; {field_hint(columns, fmt)}" if not {q_field, r_field} <= columns else ""
        raise UserError(f"{where} split {split!r}: all {len(rows)} rows are malformed, e.g. {malformed[0]}{hint}")
    logger.info("%s %s: %d rows (%s)", where, split, len(mapped), fmt)
    return mapped, stats


def load_sft_dataset(data_cfg: DataConfig, seed: int):
    """(train_dataset, eval_dataset or None, stats) for a recipe's data section; stats = {"train": .., "eval": ..}."""
    d = data_cfg
    train, train_stats = load_rows(d.source, d.split, d.format, d.query_field, d.response_field)
    eval_ds, eval_stats = None, None
    if d.eval_source or d.eval_split:
        eval_ds, eval_stats = load_rows(d.eval_source or d.source, d.eval_split or "train", d.format,
                                        d.query_field, d.response_field)
    elif d.eval_size > 0:
        if d.eval_size >= len(train):
            raise UserError(f"data.eval_size {d.eval_size} leaves no training rows (the split has {len(train)})")
        held = set(random.Random(seed).sample(range(len(train)), d.eval_size))
        eval_ds = train.select(sorted(held))
        train = train.select([i for i in range(len(train)) if i not in held])  # keeps the file order
        eval_stats = {"source": train_stats["source"], "split": f"{d.eval_size} rows held out of {d.split}",
                      "rows": d.eval_size, "kept": d.eval_size, "malformed": 0}
        train_stats["held_out_for_eval"] = d.eval_size
    return train, eval_ds, {"train": train_stats, "eval": eval_stats}


# ---------------------------------------------------------------------------------------------------------------
# Truncation


def truncation_report(dataset, tokenizer, max_length: int, batch_size: int = 1000) -> dict:
    """How many prompt+completion(+EOS) rows exceed max_length tokens (SFTTrainer cuts them at the end), and how
    many lose their whole completion (the prompt alone fills max_length: no loss tokens)."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    lengths, prompt_full, first = [], 0, []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start:start + batch_size]
        texts, prompts = _texts(batch, tokenizer)
        chat = isinstance(batch["prompt"][0], list)  # the template holds its own special tokens, TRL adds no EOS
        kw = {"add_special_tokens": False} if chat else {}
        ids = tokenizer(texts, **kw)["input_ids"]
        prompt_ids = tokenizer(prompts, **kw)["input_ids"]
        for i, (full, prompt, text) in enumerate(zip(ids, prompt_ids, texts)):
            n = len(full) + (1 if eos and not chat and not text.endswith(eos) else 0)
            lengths.append(n)
            if n > max_length and len(first) < MAX_EXAMPLES:
                first.append(start + i)
            prompt_full += len(prompt) >= max_length
    truncated = sum(n > max_length for n in lengths)
    rows = len(lengths)
    return {"rows": rows, "max_length": max_length, "truncated": truncated,
            "truncated_fraction": truncated / rows if rows else 0.0, "prompt_too_long": prompt_full,
            "max_tokens": max(lengths, default=0), "mean_tokens": sum(lengths) / rows if rows else 0.0,
            "first_truncated": first}


def _texts(batch: dict, tokenizer) -> tuple[list[str], list[str]]:
    """(prompt + completion, prompt) texts of a batch; conversations rendered with the chat template, as TRL does."""
    if not isinstance(batch["prompt"][0], list):
        return [p + c for p, c in zip(batch["prompt"], batch["completion"])], list(batch["prompt"])
    full = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(batch["prompt"], batch["completion"])]
    prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch["prompt"]]
    return full, prompts
