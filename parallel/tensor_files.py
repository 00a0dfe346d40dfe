"""Safetensors files written one tensor at a time, and read with errors that name the file.

The format is a little-endian u64 header length, a JSON header (name → dtype, shape, byte
offsets) and the raw data. Knowing every (name, dtype, shape) up front, we write the header
first and then each tensor as soon as it exists, so writing never holds more than one tensor.
Reading goes through the `safetensors` library, which never unpickles anything.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


class TensorFileError(RuntimeError):
    """A tensor file is missing, truncated, corrupted, or lacks a tensor."""


class StreamingSafetensorsWriter:
    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        """specs: (name, dtype, shape) of every tensor, in the order `write` will be called."""
        self.path, self.specs, self.next = Path(path), specs, 0
        header, offset = {}, 0
        for name, dtype, shape in specs:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.specs[self.next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: expected {want_name} {dtype} {tuple(shape)}, got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        self.file.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise ValueError(f"{self.path}: {len(self.specs) - self.next} tensors were never written")
        self.file.close()


class TensorFile:
    """Read tensors (or slices of them) from one safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TensorFileError(f"tensor file {str(self.path)!r} does not exist")
        try:
            self.handle = safe_open(str(self.path), framework="pt")
            self.names = set(self.handle.keys())
        except Exception as err:
            raise TensorFileError(f"tensor file {str(self.path)!r} is truncated or corrupted: {err}") from None
        self._check_size()

    def _check_size(self) -> None:
        with open(self.path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if self.path.stat().st_size < 8 + n + end:
            raise TensorFileError(f"tensor file {str(self.path)!r} is truncated: {self.path.stat().st_size} bytes, "
                                  f"its header needs {8 + n + end}")

    def metadata(self) -> dict:
        return self.handle.metadata() or {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise TensorFileError(f"tensor file {str(self.path)!r} has no tensor {name!r}")
        return self.handle.get_tensor(name)

    def get_rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """The slice [start, stop) of dimension `dim` (0 or 1) without reading the rest."""
        if name not in self.names:
            raise TensorFileError(f"tensor file {str(self.path)!r} has no tensor {name!r}")
        sl = self.handle.get_slice(name)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def shape(self, name: str) -> tuple:
        return tuple(self.handle.get_slice(name).get_shape())
