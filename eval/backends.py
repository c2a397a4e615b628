"""Generation backends: vLLM offline, an OpenAI-compatible server (`vllm serve`), transformers.

All three take the same `Sampling` (greedy, max tokens per task, MetaMath stop strings) and yield
`(index, completion, generated_tokens)` as results arrive, so the caller can write each one at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass

from pipeline.errors import UserError

logger = logging.getLogger(__name__)


class BackendError(UserError, RuntimeError):
    """A backend that cannot run (missing package, unreachable server); the message says what to do."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float = 0.0
    top_p: float = 1.0

    def to_dict(self) -> dict:
        return dict(asdict(self), stop=list(self.stop))


def truncate_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """Cut the text at the earliest stop string (the stop string itself is dropped, as vLLM does)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


# --- vLLM offline --------------------------------------------------------------------------------------------------

class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, seed: int = 0, **llm_kwargs):
        try:
            from vllm import LLM
        except ImportError as e:
            raise BackendError(f"vLLM is not installed here ({e}). Install it on a GPU machine (see deploy/README.md), "
                               "or use --backend hf (transformers) or --backend openai with a running "
                               "`python -m pipeline serve`.") from e
        self.llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, seed=seed, **llm_kwargs)

    def generate(self, prompts: list[str], sampling: Sampling) -> Iterator[tuple[int, str, int]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, stop=list(sampling.stop))
        # One call with every prompt: vLLM schedules and batches them itself (continuous batching).
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=True)
        except (ValueError, TypeError, RuntimeError) as e:  # e.g. VLLMValidationError: prompt longer than the context
            raise BackendError(f"vLLM refused the prompts: {e}. Use a model with a longer context, or a smaller "
                               "--max-tokens") from e
        for i, out in enumerate(outputs):
            yield i, out.outputs[0].text, len(out.outputs[0].token_ids)


# --- OpenAI-compatible HTTP ----------------------------------------------------------------------------------------

class OpenAIBackend:
    """`/v1/completions` of an OpenAI-compatible server, several requests in flight, retries with backoff."""

    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 32,
                 retries: int = 2, backoff_s: float = 1.0, timeout_s: float = 300.0):
        import requests

        self.session = requests.Session()
        # one pooled connection per request in flight; requests' default pool (10) drops the rest after each use
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(concurrency, 1))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency, self.retries, self.backoff_s, self.timeout_s = concurrency, retries, backoff_s, timeout_s
        self.model = self._pick_model(model)

    def _pick_model(self, model: str | None) -> str:
        import requests

        url = f"{self.base_url}/models"
        try:
            resp = self.session.get(url, headers=self.headers, timeout=(10, min(self.timeout_s, 30)))
        except requests.RequestException as e:
            raise BackendError(f"cannot reach the server at {url} ({type(e).__name__}). Start it with "
                               "`python -m pipeline serve ...` (or `vllm serve MODEL`) and wait until it says it is "
                               "ready, or pass the right --base-url") from e
        if resp.status_code in (401, 403):
            raise BackendError(f"{url} refused the API key (HTTP {resp.status_code}); pass --api-key")
        if resp.status_code != 200:
            raise BackendError(f"{url} answered HTTP {resp.status_code}: {resp.text[:200]}")
        cards = _json(resp, url).get("data", [])
        served = [m["id"] for m in cards]
        self.roots = {m["id"]: m.get("root") for m in cards}  # vLLM: the path or hub id each id was loaded from
        if model in served:
            return model
        if model is None and len(served) == 1:
            return served[0]
        # never score one model and file the results under another name
        raise BackendError(f"--model {model!r} is not served at {self.base_url}; it serves {served}. Pass the "
                           "served id as --model (`pipeline serve --served-model-name` sets it)")

    def _complete(self, prompt: str, sampling: Sampling) -> tuple[str, int]:
        import requests

        body = {"model": self.model, "prompt": prompt, "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "stop": list(sampling.stop), "n": 1}
        url = f"{self.base_url}/completions"
        for attempt in range(self.retries + 1):
            try:
                resp = self.session.post(url, json=body, headers=self.headers, timeout=(10, self.timeout_s))
                if resp.status_code < 500:
                    break
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except (requests.ConnectionError, requests.Timeout) as e:
                problem = f"{type(e).__name__}: {e}"
            if attempt == self.retries:
                raise BackendError(f"{url} failed {self.retries + 1} times; last: {problem}. "
                                   "Is the server still up? Finished samples are saved; rerun to resume")
            delay = self.backoff_s * 2 ** attempt
            logger.warning("%s (attempt %d/%d); retrying in %.1fs", problem, attempt + 1, self.retries + 1, delay)
            time.sleep(delay)
        if resp.status_code != 200:
            raise BackendError(f"{url} rejected the request (HTTP {resp.status_code}): {resp.text[:300]}")
        data = _json(resp, url)
        try:
            text = data["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{url} answered without choices[0].text: {resp.text[:200]!r}; is it an "
                               "OpenAI-compatible completions server?") from None
        tokens = (data.get("usage") or {}).get("completion_tokens") or 0
        return text, tokens

    def generate(self, prompts: list[str], sampling: Sampling) -> Iterator[tuple[int, str, int]]:
        # Results are yielded in this (the caller's) thread: grading uses math-verify's signal timeouts.
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._complete, p, sampling): i for i, p in enumerate(prompts)}
            try:
                for fut in as_completed(futures):
                    text, tokens = fut.result()
                    yield futures[fut], text, tokens
            finally:
                for fut in futures:
                    fut.cancel()


def _json(resp, url: str) -> dict:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise BackendError(f"{url} did not answer JSON (HTTP {resp.status_code}, "
                           f"{resp.headers.get('Content-Type', 'no content type')}): {resp.text[:120]!r}. Check "
                           "--base-url: it must point at an OpenAI-compatible server's /v1")
    return data


# --- transformers --------------------------------------------------------------------------------------------------

class HFBackend:
    """Batched greedy `generate` with left padding; for CPUs and machines without vLLM."""

    name = "hf"

    def __init__(self, model: str, batch_size: int = 8, dtype: str = "auto", device: str | None = None):
        import torch

        from pipeline.modeling import load_model, load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"  # decoder-only: pad on the left so every row ends at the prompt
        self.model = load_model(model, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size

    def generate(self, prompts: list[str], sampling: Sampling) -> Iterator[tuple[int, str, int]]:
        import torch
        from tqdm import tqdm
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StepBar(StoppingCriteria):
            """Never stops generation; moves a bar one decoding step at a time (a CPU batch can take minutes)."""

            def __init__(self, bar):
                self.bar = bar

            def __call__(self, input_ids, scores, **kwargs):
                self.bar.update(1)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        tok = self.tokenizer
        # Longest prompts first: similar lengths share a batch, less padding; the first batch shows the peak memory.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        n_batches = -(-len(order) // self.batch_size)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(self.device)
            desc = f"batch {start // self.batch_size + 1}/{n_batches}: tokens (at most)"
            with torch.inference_mode(), tqdm(total=sampling.max_tokens, desc=desc, leave=False) as bar:
                out = self.model.generate(**enc, max_new_tokens=sampling.max_tokens, do_sample=False,
                                          temperature=None, top_p=None, top_k=None,
                                          stop_strings=list(sampling.stop), tokenizer=tok,
                                          pad_token_id=tok.pad_token_id,
                                          stopping_criteria=StoppingCriteriaList([StepBar(bar)]))
            new = out[:, enc["input_ids"].shape[1]:]
            for row, i in zip(new, idx):
                text = truncate_at_stop(tok.decode(row, skip_special_tokens=True), sampling.stop)
                tokens = int((row != tok.pad_token_id).sum()) if tok.pad_token_id is not None else len(row)
                yield i, text, tokens


def make_backend(name: str, model: str | None, *, batch_size: int | None, tensor_parallel_size: int,
                 base_url: str | None, api_key: str | None, timeout_s: float = 300.0, attempts: int = 3):
    if name == "vllm":
        return VLLMBackend(model, tensor_parallel_size=tensor_parallel_size)
    if name == "openai":
        return OpenAIBackend(base_url, model=model, api_key=api_key, concurrency=batch_size or 32,
                             retries=attempts - 1, timeout_s=timeout_s)
    if name == "hf":
        try:
            return HFBackend(model, batch_size=batch_size or 8)
        except OSError as e:  # transformers' "not a local folder and not a valid model identifier" and the like
            raise BackendError(f"could not load --model {model!r} with transformers: {e}") from e
    raise BackendError(f"unknown backend {name!r}; use vllm, openai or hf")
