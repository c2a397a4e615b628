"""CPU: how many kernels inductor generates for one compiled EDoRA train step of a tiny 2-layer Llama.

Deterministic (unlike CPU timings on a small shared machine), so two checkouts can be compared exactly:

    python benchmarks/compile_kernels.py [ROOT]      # ROOT: a checkout of the project (default: this one)
"""

import sys
from pathlib import Path

import torch

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
sys.path[:0] = [str(root), str(root / "tests")]

from helpers import ALL_LINEAR, tiny_llama  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch._inductor import metrics  # noqa: E402

from pipeline.edora import EdoraConfig  # noqa: E402

model = get_peft_model(tiny_llama(layers=2), EdoraConfig(r=4, target_modules=ALL_LINEAR))
model.train()
ids = torch.randint(0, 128, (1, 8))
metrics.reset()
torch.compile(model)(input_ids=ids, labels=ids).loss.backward()
print(f"{root}: {metrics.generated_kernel_count} generated kernels (forward + backward)")
