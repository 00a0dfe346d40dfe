"""Safetensors files written one tensor at a time, and read with errors that name the file.

The format is a little-endian u64 header length, a JSON header (name → dtype, shape, byte
offsets) and the raw data. Knowing every (name, dtype, shape) up front, we write the header
first and then each tensor as soon as it exists, so writing never holds more than one tensor.
Reading parses the same header and reads the bytes: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

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
        if data.numel():
            self.file.write(memoryview(data.view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise ValueError(f"{self.path}: {len(self.specs) - self.next} tensors were never written")
        self.file.close()


_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class TensorFile:
    """Read tensors (or row slices of them) from one safetensors file with plain reads.

    Not through a memory map: mapped pages that have been read stay in the process's resident
    memory, so converting a model would look (and, under a cgroup limit, count) as large as the
    model; reading into fresh tensors keeps the peak at the tensors actually held."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TensorFileError(f"tensor file {str(self.path)!r} does not exist")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except Exception as err:
            raise TensorFileError(f"tensor file {str(self.path)!r} is truncated or corrupted: {err}") from None
        self._metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.entries = {}
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in _CODE_DTYPES:
                raise TensorFileError(f"tensor file {str(self.path)!r}: {name} has unsupported dtype {e['dtype']}")
            dtype = _CODE_DTYPES[e["dtype"]]
            if end - begin != torch.Size(e["shape"]).numel() * torch.empty((), dtype=dtype).element_size():
                raise TensorFileError(f"tensor file {str(self.path)!r} is corrupted: {name}'s size disagrees with "
                                      "its shape")
            self.entries[name] = (dtype, tuple(e["shape"]), begin, end)
        end = max((e[3] for e in self.entries.values()), default=0)
        if size < self.data_start + end:
            raise TensorFileError(f"tensor file {str(self.path)!r} is truncated: {size} bytes, its header needs "
                                  f"{self.data_start + end}")
        self.names = set(self.entries)

    def metadata(self) -> dict:
        return dict(self._metadata)

    def _entry(self, name: str):
        if name not in self.entries:
            raise TensorFileError(f"tensor file {str(self.path)!r} has no tensor {name!r}")
        return self.entries[name]

    def _read(self, offset: int, nbytes: int, dtype, shape) -> torch.Tensor:
        buf = bytearray(nbytes)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + offset)
            if f.readinto(buf) != nbytes:
                raise TensorFileError(f"tensor file {str(self.path)!r} is truncated")
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entry(name)
        return self._read(begin, end - begin, dtype, shape)

    def get_rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """The slice [start, stop) of dimension `dim` (0: read only those rows)."""
        dtype, shape, begin, _ = self._entry(name)
        if dim != 0:
            return self.get(name).narrow(dim, start, stop - start).contiguous()
        row = torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
        return self._read(begin + start * row, (stop - start) * row, dtype, (stop - start, *shape[1:]))

    def shape(self, name: str) -> tuple:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]
