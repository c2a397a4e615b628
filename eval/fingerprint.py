"""A fingerprint of a checkpoint's weights, so results name what produced them and a resume notices new weights.

sha256 over config.json, the safetensors index, merge_report.json (a re-merge rewrites it) and, per *.safetensors
file, its name, size and SAMPLES slices of SAMPLE_BYTES spread over the file: a few MB read even for a 7B model,
and weights merged from another adapter differ in nearly every slice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLES = 16
SAMPLE_BYTES = 1 << 16
META_FILES = ("config.json", "model.safetensors.index.json", "merge_report.json")


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """'sha256:<hex>' for a local checkpoint dir with safetensors weights, else None (a hub id, a .gguf file)."""
    d = Path(model_dir)
    shards = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    if not shards:
        return None
    h = hashlib.sha256()
    for name in META_FILES:
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    for f in shards:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for i in range(SAMPLES):
                fh.seek(size * i // SAMPLES)
                h.update(fh.read(SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()[:32]
