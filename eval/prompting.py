"""Which prompt an eval uses: the format training recorded for the model (metamath or chat), and the chat renderer."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.adapter_meta import AdapterMeta
from pipeline.errors import UserError
from pipeline.specs import ModelSpec


def trained_prompt_format(model: str | None) -> str | None:
    """The prompt format a training run recorded for this model (runs/<name>/adapter/edora_meta.json), if any."""
    if not model or not Path(model).is_dir():
        return None
    for d in (Path(model), Path(model).parent / "adapter"):
        meta = AdapterMeta.read(d)
        if meta is not None:
            return meta.prompt_format
    stats = Path(model).parent / "data_stats.json"  # a full fine-tune (runs/<name>/merged) has no adapter meta
    if ModelSpec.parse(model).run_dir is not None and stats.is_file():
        formats = json.loads(stats.read_text())["train"]["format"]
        return "chat" if "messages" in (formats if isinstance(formats, list) else [formats]) else "metamath"
    return None


def chat_renderer(model: str):
    """(render(question) -> text, the template): the question as one user turn in the model's chat template, with the
    generation prompt. A leading BOS is dropped: the backends' tokenizers add it again."""
    from pipeline.modeling import load_tokenizer

    try:
        tok = load_tokenizer(model)
    except OSError as e:
        raise UserError(f"--prompt chat needs the model's tokenizer: {e}") from None
    template = getattr(tok, "chat_template", None)
    if not template:
        raise UserError(f"--prompt chat: the tokenizer of {model} has no chat template; use --prompt metamath")

    def render(question: str) -> str:
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        return text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text

    return render, template
