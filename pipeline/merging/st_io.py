"""Streaming safetensors: read one tensor at a time from a sharded checkpoint, write shards tensor by tensor.

The writer lays out each output shard's header from the planned names, dtypes and shapes first, then appends each
tensor's bytes as it is produced, so the merge never holds more than the tensor it is working on (safetensors'
own `save_file` needs the whole shard in memory, and a second copy of it as bytes).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
FROM_ST = {v: k for k, v in ST_DTYPES.items()}


def natural_key(name: str):
    """Sort 'layers.10' after 'layers.9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class BaseCheckpoint:
    """A local safetensors checkpoint (one file or an index + shards). Reads open and close the file per tensor,
    so mapped pages of the base never pile up in the process."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.dir / v for k, v in weight_map.items()}
        elif (self.dir / "model.safetensors").is_file():
            self.files = {k: self.dir / "model.safetensors" for k in _header(self.dir / "model.safetensors")}
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.dir}")
        self.meta = {}
        for path in sorted(set(self.files.values())):
            for k, v in _header(path).items():
                self.meta[k] = (FROM_ST[v["dtype"]], tuple(v["shape"]))

    def keys(self) -> list[str]:
        return sorted(self.files, key=natural_key)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def head(self, key: str, rows: int) -> torch.Tensor:
        """The first `rows` rows of a tensor, read without the rest."""
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_slice(key)[:rows]


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@dataclass
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Greedy packing in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_index(out_dir: Path, shards: list[list[Entry]]) -> None:
    names = shard_names(len(shards))
    index = {"metadata": {"total_size": sum(e.nbytes for s in shards for e in s)},
             "weight_map": {e.name: names[i] for i, s in enumerate(shards) for e in s}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class ShardWriter:
    """Writes one safetensors file whose tensors arrive one at a time in the planned order."""

    def __init__(self, path: Path, entries: list[Entry]):
        self.path, self.entries, self.pos = Path(path), entries, 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for e in entries:
            header[e.name] = {"dtype": ST_DTYPES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        e = self.entries[self.pos]
        if name != e.name or t.dtype != e.dtype or tuple(t.shape) != e.shape:
            raise RuntimeError(f"shard writer expected {e} next, got {name} {t.dtype} {tuple(t.shape)}")
        self.f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.pos += 1

    def close(self) -> None:
        self.f.close()
        if self.pos != len(self.entries):
            raise RuntimeError(f"{self.path}: wrote {self.pos} of {len(self.entries)} tensors")
