"""CPU: the aten ops one eager EDoRA train step of a tiny 2-layer Llama dispatches (forward + backward), in order.

Deterministic, so two checkouts can be compared exactly: the same op sequence launches the same GPU kernels, which
is how a refactor of pipeline/edora is shown to leave the eager kernels unchanged without a GPU:

    python benchmarks/eager_ops.py [ROOT]      # ROOT: a checkout of the project (default: this one)
"""

import hashlib
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
sys.path[:0] = [str(root), str(root / "tests")]

from helpers import ALL_LINEAR, tiny_llama  # noqa: E402
from peft import get_peft_model  # noqa: E402

from pipeline.edora import EdoraConfig  # noqa: E402


class Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


model = get_peft_model(tiny_llama(layers=2), EdoraConfig(r=4, target_modules=ALL_LINEAR))
model.train()
ids = torch.randint(0, 128, (1, 8))
with Record() as rec:
    model(input_ids=ids, labels=ids).loss.backward()
digest = hashlib.sha256("\n".join(rec.ops).encode()).hexdigest()[:16]
top = ", ".join(f"{op} {n}" for op, n in Counter(rec.ops).most_common(6))
print(f"{root}: {len(rec.ops)} aten ops (forward + backward), sequence sha256 {digest}; most: {top}")
