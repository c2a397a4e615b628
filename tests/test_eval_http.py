"""The OpenAI-compatible backend against a tiny fake server on 127.0.0.1, and resuming an interrupted run."""

import json

import pytest
from helpers import GSM8K_ROWS, FakeServer, dead_url, write_jsonl

from eval.backends import BackendError, OpenAIBackend, Sampling
from pipeline.cli import main as cli_main

SAMPLING = Sampling(max_tokens=32, stop=("Instruction", "Response"))


def test_completions_sent_with_shared_settings():
    with FakeServer() as server:
        backend = OpenAIBackend(server.url, model="fake-model", concurrency=4, timeout_s=10)
        prompts = [f"### Instruction:\n{r['question']}\n\n### Response: Let's think step by step."
                   for r in GSM8K_ROWS]
        results = sorted(backend.generate(prompts, SAMPLING))
    assert [i for i, _, _ in results] == [0, 1, 2, 3]
    assert results[1][1].endswith("The answer is: 1234") and results[1][2] == 9
    body = server.requests[0]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (0.0, 1.0, 32,
                                                                                      ["Instruction", "Response"])


def test_many_requests_in_flight_reuse_their_connections(caplog):
    # found on the GPU host against `vllm serve`: with 32 in flight, requests' default pool of 10 discarded the
    # other connections after each request (one urllib3 warning each, and a new TCP connection next time)
    prompts = [f"### Instruction:\n{r['question']}\n\n### Response:" for r in GSM8K_ROWS] * 8
    with FakeServer() as server, caplog.at_level("WARNING", logger="urllib3.connectionpool"):
        backend = OpenAIBackend(server.url, concurrency=16, timeout_s=10)
        assert len(list(backend.generate(prompts, SAMPLING))) == 32
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_retries_a_500_then_succeeds():
    with FakeServer(fail_first=2) as server:
        backend = OpenAIBackend(server.url, concurrency=1, backoff_s=0.01, timeout_s=10)
        assert backend.model == "fake-model"  # the one served model is picked when --model is not given
        (_, text, _), = backend.generate(["### Instruction:\nHalf of 10?\n\n### Response:"], SAMPLING)
    assert text.endswith("The answer is: 5") and len(server.requests) == 3


def test_gives_up_after_retries_with_a_clear_error():
    with FakeServer(fail_first=100) as server:
        backend = OpenAIBackend(server.url, retries=2, backoff_s=0.01, timeout_s=10)
        with pytest.raises(BackendError, match="failed 3 times; last: HTTP 500"):
            list(backend.generate(["### Instruction:\nx\n\n### Response:"], SAMPLING))
    assert len(server.requests) == 3


def test_dead_server_is_a_clear_cli_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    url = dead_url()
    code = cli_main(["eval", "--model", "m", "--backend", "openai", "--base-url", url, "--tasks", "gsm8k",
                     "--data-file", f"gsm8k={data}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot reach the server at {url}/models" in err and "pipeline serve" in err


def test_openai_backend_end_to_end_and_resume(tmp_path):
    """Two samples already done plus a torn last line (a killed run): only the other two are generated."""
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    out = tmp_path / "o"
    with FakeServer() as server:
        args = ["eval", "--model", "fake-model", "--backend", "openai", "--base-url", server.url, "--tasks",
                "gsm8k", "--data-file", f"gsm8k={data}", "--out", str(out)]
        assert cli_main(args + ["--limit", "2"]) == 0
        assert len(server.requests) == 2
        with (out / "samples.jsonl").open("a") as f:
            f.write('{"task": "gsm8k", "id": "2", "completion": "The ans')  # killed mid-write
        assert cli_main(args) == 0
        assert len(server.requests) == 4  # ids 2 and 3 only
        assert cli_main(args) == 0
        assert len(server.requests) == 4  # all done: nothing regenerated
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert sorted(r["id"] for r in rows) == ["0", "1", "2", "3"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["gsm8k"]["accuracy"] == {"strict": 1.0, "flexible": 1.0}
    assert summary["backend"] == "openai" and summary["resumed_samples"] == 4
    assert summary["sampling"]["gsm8k"]["max_tokens"] == 1024


def test_changed_sampling_is_not_mixed_into_a_run(tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    with FakeServer() as server:
        args = ["eval", "--model", "fake-model", "--backend", "openai", "--base-url", server.url, "--tasks",
                "gsm8k", "--data-file", f"gsm8k={data}", "--out", str(tmp_path / "o"), "--limit", "1"]
        assert cli_main(args) == 0
        assert cli_main(args + ["--max-tokens", "16"]) == 2
    assert "gsm8k sampling was" in capsys.readouterr().err
