"""What several test modules share (no test module imports another): tiny models built from config (no downloads,
seconds on a CPU), data rows and recipes, a fake OpenAI-compatible server, and the independent reference formula
of EDoRA that the tests pin the implementation against."""

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import torch
import yaml
from tests_paths import ROOT
from transformers import LlamaConfig, LlamaForCausalLM

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype=torch.float32, layers: int = 2, vocab: int = 128, hidden: int = 64,
               intermediate: int = 96, heads: int = 4, kv_heads: int = 2, max_positions: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


def tiny_tokenizer(save_dir=None, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in a fraction of a second on a few math sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction: ### Response: Let's think step by step. The answer is: 42",
        "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. 0123456789 +-*/=$%.,",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def quantize_linears_nf4(model, targets=ALL_LINEAR, device="cuda") -> None:
    """Swap a Llama/Mistral decoder's projections for bitsandbytes NF4 Linear4bit (bf16 compute) on `device`."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to(device))
    model.is_loaded_in_4bit = True


def reference_weight(w0, A, B, R, m, s, use_magnitude=True, detach_norm=False):
    """EDoRA's adapted weight built densely from the paper's formula (DESIGN.md), independent of pipeline/edora:
    W' = (m / n) ⊙_row (W0 + s·B R A) with n = ||W0 + s·B R A||_row taken directly (detached when `detach_norm`,
    DoRA §4.3); without magnitude (LoRA-XS) W' = W0 + s·B R A."""
    w = w0 + s * B @ R @ A
    if not use_magnitude:
        return w
    n = torch.linalg.vector_norm(w, dim=1)
    return (m / (n.detach() if detach_norm else n))[:, None] * w


def data_cfg(**kw):
    base = dict(source="", split="train", format="auto", query_field=None, response_field=None, max_length=512,
                eval_source=None, eval_split=None, eval_size=0, num_proc=None)
    return SimpleNamespace(**{**base, **kw})


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GSM8K_ROWS = [  # gold after '####', as in GSM8K
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A book costs $1,200 and a pen $34. Total?", "answer": "1200 + 34 = 1234\n#### 1,234"},
    {"question": "It is 2 degrees and drops by 5. Temperature?", "answer": "2 - 5 = -3\n#### -3"},
    {"question": "Half of 10?", "answer": "#### 5"},
]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "eval", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def gsm8k_rows(n=48):
    rows = []
    for i in range(n):
        a, b = 3 + i, 7 + 2 * i
        rows.append({"question": f"Tom has {a} apples and buys {b} more. How many apples?",
                     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return rows


def tiny_run_root(root, n_rows=48):
    """root/model (a tiny Llama and its tokenizer) and root/gsm8k.jsonl (n_rows GSM8K-style rows): what
    write_recipe points a recipe at."""
    tiny_llama(seed=0, vocab=300).save_pretrained(root / "model")
    tiny_tokenizer(root / "model")
    write_jsonl(root / "gsm8k.jsonl", gsm8k_rows(n_rows))
    return root


def write_recipe(root, name, tmp_path, **changes):
    recipe = yaml.safe_load((ROOT / "recipes/smollm2-135m/edora-gsm8k-cpu.yaml").read_text())
    recipe.update(name=name, output_dir=str(tmp_path / "runs"))
    recipe["model"]["name_or_path"] = str(root / "model")
    recipe["adapter"]["r"] = 4
    recipe["data"].update(source=str(root / "gsm8k.jsonl"), split="train", max_length=256)
    recipe["training"].update(max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2, warmup_ratio=0.0,
                              logging_steps=1, save_steps=4, lr_scheduler_type="constant")
    for section, values in changes.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


ANSWERS = {r["question"]: r["answer"].split("####")[1].strip().replace(",", "") for r in GSM8K_ROWS}


class FakeServer:
    """Serves /v1/models and /v1/completions; answers each GSM8K question with its gold (first `fail_first`
    completion requests get HTTP 500). Records the request bodies."""

    def __init__(self, fail_first: int = 0, model: str = "fake-model"):
        self.fail_first, self.model, self.requests = fail_first, model, []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fail = len(fake.requests) <= fake.fail_first
                if fail:
                    self._send(500, {"error": "boom"})
                    return
                question = body["prompt"].split("### Instruction:\n")[1].split("\n\n### Response")[0]
                text = f" Step by step.\nThe answer is: {ANSWERS.get(question, 0)}"
                self._send(200, {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                                 "usage": {"completion_tokens": 9}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


VOCAB = 300


def perturb(model, sigma=0.05):
    """Training stand-in: R and m away from their init so the merge has something to fold in."""
    from pipeline.edora import Linear

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, Linear)):
            r = layer.edora_R["default"]
            r.copy_(torch.randn(r.shape, generator=gen) * sigma)
            if "default" in layer.edora_magnitude:
                mag = layer.edora_magnitude["default"]
                mag.mul_(1 + 0.05 * torch.randn(mag.shape, generator=gen))


def make_run(root, use_magnitude=True, **base_kw):
    """root/base (tiny Llama + tokenizer) and root/run/adapter; returns (base dir, adapter dir, input ids, logits)."""
    from peft import get_peft_model

    from pipeline.edora import EdoraConfig

    base = tiny_llama(seed=0, vocab=VOCAB, **base_kw)
    base.save_pretrained(root / "base")
    tiny_tokenizer(root / "base", vocab_size=VOCAB)
    model = get_peft_model(base, EdoraConfig(r=4, target_modules=ALL_LINEAR, seed=3, use_magnitude=use_magnitude))
    perturb(model)
    model.save_pretrained(root / "run" / "adapter")
    cfg_path = root / "run" / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(root / "base")
    cfg_path.write_text(json.dumps(cfg))
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x).logits
    return root / "base", root / "run" / "adapter", x, logits
