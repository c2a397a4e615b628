"""Eval guarantees (issue 14): results name what produced them (served model id, weights fingerprint, checked on
resume), secrets never reach result files, a silent or non-JSON server and an adapter dir are one-line errors.
Each test reproduces a case that 84acf48 got wrong."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import GSM8K_ROWS, FakeServer, write_jsonl

from pipeline.cli import main as cli_main


def eval_args(server_url, model, data, out, *extra):
    return ["eval", "--model", str(model), "--backend", "openai", "--base-url", server_url, "--tasks", "gsm8k",
            "--data-file", f"gsm8k={data}", "--out", str(out), *extra]


def test_a_model_the_server_does_not_serve_is_an_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    with FakeServer(model="other-model") as server:
        assert cli_main(eval_args(server.url, "my-model", data, tmp_path / "o")) == 2
        assert server.requests == []  # nothing generated, nothing filed under the wrong name
    err = capsys.readouterr().err
    assert "'my-model' is not served" in err and "other-model" in err


def fake_checkpoint(d, content: bytes):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(content)
    return d


def test_reloaded_weights_under_the_same_name_are_not_mixed_in(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    model = fake_checkpoint(tmp_path / "merged", b"\x01" * 4096)
    out = tmp_path / "o"
    with FakeServer(model=str(model)) as server:
        assert cli_main(eval_args(server.url, model, data, out, "--limit", "2")) == 0
        run = json.loads((out / "run.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        assert run["served_model"] == summary["served_model"] == str(model)
        assert run["model_fingerprint"].startswith("sha256:") and summary["model_fingerprint"] == run[
            "model_fingerprint"]
        fake_checkpoint(model, b"\x02" * 4096)  # re-merged at the same path
        assert cli_main(eval_args(server.url, model, data, out)) == 2
        assert len(server.requests) == 2
    assert "weights fingerprint was" in capsys.readouterr().err


def test_the_api_key_never_reaches_result_files(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    out = tmp_path / "o"
    with FakeServer() as server:
        args = eval_args(server.url, "fake-model", data, out, "--limit", "1", "--api-key", "SECRET-123")
        monkeypatch.setattr(sys, "argv", ["/x/pipeline/__main__.py", *args])
        assert cli_main(args) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "summary.json" in files and "run.json" in files
    assert not [name for name, b in files.items() if b"SECRET-123" in b]
    assert "--api-key ***" in json.loads(files["summary.json"])["command"]


class OddServer:
    """/v1/models answers `models` (bytes, content type); POST /v1/completions sleeps `hang_s` first."""

    def __init__(self, models: bytes, content_type: str = "application/json", hang_s: float = 0.0):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, body, ctype):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(models, content_type)

            def do_POST(self):
                time.sleep(hang_s)
                self._send(b'{"choices": [{"text": "The answer is: 1"}]}', "application/json")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_non_json_reply_is_a_one_line_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    with OddServer(b"<html>login</html>", "text/html") as server:
        assert cli_main(eval_args(server.url, "m", data, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "did not answer JSON" in err and "text/html" in err and "Traceback" not in err


def test_a_silent_server_is_reported_in_seconds(tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    models = json.dumps({"data": [{"id": "m"}]}).encode()
    with OddServer(models, hang_s=8) as server:
        t0 = time.monotonic()
        code = cli_main(eval_args(server.url, "m", data, tmp_path / "o", "--limit", "1", "--request-timeout", "0.5",
                                  "--attempts", "2"))
        took = time.monotonic() - t0
    assert code == 2 and "failed 2 times" in capsys.readouterr().err
    assert took < 6


def test_eval_of_an_adapter_dir_says_to_merge(tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "EDORA"}')
    code = cli_main(["eval", "--model", str(tmp_path / "adapter"), "--backend", "hf", "--tasks", "gsm8k",
                     "--data-file", f"gsm8k={data}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "is an adapter dir" in err and "pipeline merge --adapter" in err
    assert "KeyError" not in err


@pytest.mark.parametrize("flag", ["--api_key", "--api-k"])
def test_eval_flag_typos_are_errors(tmp_path, capsys, flag):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    assert cli_main(["eval", "--model", "m", "--tasks", "gsm8k", "--data-file", f"gsm8k={data}", flag, "K"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_finished_run_regenerates_its_summary_without_the_server(tmp_path):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    out = tmp_path / "o"
    with FakeServer() as server:
        args = eval_args(server.url, "fake-model", data, out, "--limit", "1")
        assert cli_main(args) == 0
    assert cli_main(args) == 0  # server gone, nothing left to generate
    assert json.loads((out / "summary.json").read_text())["served_model"] == "fake-model"
