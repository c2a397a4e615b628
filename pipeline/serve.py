"""`python -m pipeline serve --model runs/<name>/merged`: vLLM's OpenAI-compatible server for a merged checkpoint.

vLLM cannot load EDoRA (or DoRA) adapters, so this serves merged checkpoints only, and says so when handed an adapter.
vLLM pins its own torch/transformers: install it in its own environment (deploy/README.md). The command replaces this
process with `vllm serve ...`, so Ctrl-C and signals reach vLLM directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, fields

from pipeline.dtypes import FLOAT_DTYPES
from pipeline.errors import UserError
from pipeline.runstate import redact_argv

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="merged checkpoint dir (python -m pipeline merge) or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 to serve other machines)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="bfloat16", choices=[*FLOAT_DTYPES, "auto"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model replica")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--served-model-name", default=None, help="name clients pass as 'model' (default: --model)")
    parser.add_argument("--api-key", default=None, help="require this key from clients")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--insecure", action="store_true",
                        help="allow serving on a non-loopback --host without --api-key (anyone who can reach the "
                             "port can use the model)")
    parser.add_argument("--dry-run", action="store_true", help="print the vllm command and exit")


@dataclass
class ServeRequest:
    """The serve command's options, typed (the fields are its flags' names)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    gpu_memory_utilization: float | None = None
    insecure: bool = False
    dry_run: bool = False


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to any interface


def check_exposure(req: ServeRequest) -> None:
    """An open server on a reachable interface must be asked for explicitly."""
    if is_loopback(req.host) or req.api_key:
        return
    if not req.insecure:
        raise UserError(f"--host {req.host} serves beyond this machine, and without --api-key anyone who reaches port "
                        f"{req.port} can use the model. Pass --api-key KEY (clients send it as a Bearer token), or "
                        "--insecure to serve openly, or keep the default --host 127.0.0.1")
    logger.warning("serving on %s:%d without an API key (--insecure)", req.host, req.port)


def vllm_command(req: ServeRequest) -> list[str]:
    cmd = ["vllm", "serve", req.model, "--host", req.host, "--port", str(req.port), "--dtype", req.dtype,
           "--tensor-parallel-size", str(req.tensor_parallel_size)]
    if req.max_model_len:
        cmd += ["--max-model-len", str(req.max_model_len)]
    if req.served_model_name:
        cmd += ["--served-model-name", req.served_model_name]
    if req.api_key:
        cmd += ["--api-key", req.api_key]
    if req.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(req.gpu_memory_utilization)]
    return cmd


def check_model(model: str) -> None:
    from pipeline.specs import ModelSpec

    spec = ModelSpec.parse(model) if not model.startswith("pkg://") else ModelSpec(model, "missing")
    if spec.kind in ("hub", "missing"):
        if not spec.is_org_name:
            raise UserError(f"--model {model}: no such directory (and it does not look like a hub id 'org/name')")
        return  # a hub id: vLLM downloads it
    path = spec.path
    if (path / "adapter_config.json").exists():
        raise UserError(f"{model} is an adapter, and vLLM cannot load EDoRA adapters. Merge it first: "
                        f"python -m pipeline merge --adapter {model}  (then serve the 'merged' dir it prints)")
    if not (path / "config.json").exists():
        raise UserError(f"{model} has no config.json: pass a merged checkpoint dir (runs/<name>/merged)")
    if not list(path.glob("*.safetensors")):
        raise UserError(f"{model} has no *.safetensors weights; was the merge interrupted? Run the merge again")


def check_server_imports() -> None:
    """Import vLLM's OpenAI server before handing over: a dependency missing from vLLM's environment then gets one
    clear line here instead of a traceback from the server process (seen: jmespath, with a wheel-staged vLLM)."""
    try:
        importlib.import_module("vllm.entrypoints.openai.api_server")
    except ImportError as e:
        missing = getattr(e, "name", None)
        fix = f"pip install {missing}" if missing else "reinstall vLLM with its dependencies"
        raise UserError(f"vLLM is installed but its OpenAI server cannot be imported: {e}. Fix vLLM's environment "
                        f"({fix}) and try again; see deploy/README.md") from e


def main(args) -> int:
    return serve(ServeRequest(**{f.name: getattr(args, f.name) for f in fields(ServeRequest)}))


def serve(req: ServeRequest) -> int:
    """Check the model and the exposure, then replace this process with `vllm serve` (dry_run: print the command)."""
    check_model(req.model)
    check_exposure(req)
    if req.tensor_parallel_size < 1:
        raise UserError("--tensor-parallel-size must be >= 1")
    cmd = vllm_command(req)
    if req.dry_run:
        print(shlex.join(cmd))
        return 0
    exe = shutil.which("vllm")
    if exe is None and importlib.util.find_spec("vllm") is not None:
        # installed without its console script (pip --target, some venvs): run vLLM's CLI module directly
        exe = sys.executable
        cmd = [sys.executable, "-c", "import sys; from vllm.entrypoints.cli.main import main; "
               "sys.argv = ['vllm'] + sys.argv[1:]; main()"] + cmd[1:]
    if exe is None:
        raise UserError("vLLM is not installed in this environment. Install it in its own environment "
                        "(pip install -r deploy/requirements-vllm.txt; see deploy/README.md), or use --dry-run to "
                        "print the command")
    check_server_imports()
    logger.info("starting: %s", shlex.join(redact_argv(cmd)))
    sys.stdout.flush()
    os.execv(exe, cmd)
    return 0  # not reached
