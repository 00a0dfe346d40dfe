"""Safetensors files written one tensor at a time, and read with errors that name the file.

The format is a little-endian u64 header length, a JSON header (name → dtype, shape, byte
offsets) and the raw data. Knowing every (name, dtype, shape) up front, we write the header
first and then each tensor as soon as it exists, so writing never holds more than one tensor.
Reading parses the same header and reads the bytes: nothing is ever unpickled.

Every file we write carries a CRC-32 of each tensor's bytes in its header's `__metadata__`
(key `crc32`, a JSON object name → 8 hex digits: metadata values must be strings, so other
safetensors readers see an ordinary metadata entry). The header is written first with
placeholders of the same width, and rewritten in place at `close` once every tensor's bytes
have been hashed as they streamed past: the sums live inside the file they describe, so copying
or renaming a file keeps them. A reader verifies a tensor the first time any part of it is
read; files without sums (older checkpoints, Meta's or Hugging Face's files) load unverified.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import torch

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
CHECKSUM_KEY = "crc32"
_UNWRITTEN = "-" * 8  # a sum's placeholder until close: as wide as the 8 hex digits that replace it
_VERIFY_CHUNK = 64 * 2**20  # verifying a tensor read in part reads it whole, this many bytes at a time


class TensorFileError(RuntimeError):
    """A tensor file is missing, truncated, corrupted, or lacks a tensor."""


class StreamingSafetensorsWriter:
    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        """specs: (name, dtype, shape) of every tensor, in the order `write` will be called."""
        self.path, self.specs, self.next = Path(path), specs, 0
        self.header, offset = {}, 0
        for name, dtype, shape in specs:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            self.header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                                 "data_offsets": [offset, offset + n]}
            offset += n
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.sums = {name: _UNWRITTEN for name, _, _ in specs}
        raw = self._raw_header()
        self.file = None
        try:
            self.file = open(self.path, "wb")
            self.file.write(raw)
        except OSError as err:
            self._fail(err)

    def _raw_header(self) -> bytes:
        meta = {**self.metadata, CHECKSUM_KEY: json.dumps(self.sums, separators=(",", ":"))}
        raw = json.dumps({"__metadata__": meta, **self.header}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def _fail(self, err: OSError):
        """Close what is open without flushing again (a full disk would fail again) and name the file."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
        raise TensorFileError(f"cannot write tensor file {str(self.path)!r}: {err.strerror or err}") from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.specs[self.next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: expected {want_name} {dtype} {tuple(shape)}, got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        raw = memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""
        self.sums[name] = f"{zlib.crc32(raw):08x}"
        try:
            self.file.write(raw)
        except OSError as err:
            self._fail(err)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise ValueError(f"{self.path}: {len(self.specs) - self.next} tensors were never written")
        raw = self._raw_header()
        try:
            self.file.seek(0)  # the sums, in place of their placeholders: the header keeps its length
            self.file.write(raw)
            self.file.close()
        except OSError as err:
            self._fail(err)


_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class TensorFile:
    """Read tensors (or row slices of them) from one safetensors file with plain reads.

    Not through a memory map: mapped pages that have been read stay in the process's resident
    memory, so converting a model would look (and, under a cgroup limit, count) as large as the
    model; reading into fresh tensors keeps the peak at the tensors actually held.

    `verify`: check each tensor's saved CRC-32 the first time any of it is read (`get` hashes the
    bytes it read; `get_rows` reads the whole tensor once more). A loader that learns of damage
    from another rank may pass False and read only its slices; `verify(name)` still checks."""

    def __init__(self, path: str | Path, verify: bool = True):
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
        self.checksums = self._parse_checksums()
        self.auto_verify = verify
        self._verified: set[str] = set()

    def _parse_checksums(self) -> dict[str, int]:
        """name → saved CRC-32; empty for a file written without them."""
        text = self._metadata.get(CHECKSUM_KEY)
        if text is None:
            return {}
        bad = f"tensor file {str(self.path)!r} is corrupted: its {CHECKSUM_KEY} metadata "
        try:
            sums = json.loads(text)
        except ValueError:
            raise TensorFileError(bad + "is not JSON") from None
        if not isinstance(sums, dict) or set(sums) != self.names:
            raise TensorFileError(bad + "does not name its tensors")
        if _UNWRITTEN in sums.values():
            raise TensorFileError(f"tensor file {str(self.path)!r} was never finished (its writer stopped before "
                                  "recording the checksums)")
        try:
            return {name: int(value, 16) for name, value in sums.items()}
        except (TypeError, ValueError):
            raise TensorFileError(bad + "holds a value that is not hexadecimal") from None

    @property
    def has_checksums(self) -> bool:
        return bool(self.checksums) or not self.names

    def metadata(self) -> dict:
        return {k: v for k, v in self._metadata.items() if k != CHECKSUM_KEY}

    def _entry(self, name: str):
        if name not in self.entries:
            raise TensorFileError(f"tensor file {str(self.path)!r} has no tensor {name!r}")
        return self.entries[name]

    def _check(self, name: str, crc: int) -> None:
        saved = self.checksums[name]
        if crc != saved:
            raise TensorFileError(f"tensor file {str(self.path)!r}: tensor {name!r} fails its checksum (saved crc32 "
                                  f"{saved:08x}, read {crc:08x}): the file is damaged")
        self._verified.add(name)

    def _unverified(self, name: str) -> bool:
        return name in self.checksums and name not in self._verified

    def verify(self, name: str) -> None:
        """Check `name`'s bytes against its saved checksum (once; a no-op for a file without sums)."""
        _, _, begin, end = self._entry(name)
        if not self._unverified(name):
            return
        crc, left = 0, end - begin
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            while left:
                chunk = f.read(min(left, _VERIFY_CHUNK))
                if not chunk:
                    raise TensorFileError(f"tensor file {str(self.path)!r} is truncated")
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        self._check(name, crc)

    def _read_bytes(self, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + offset)
            if f.readinto(buf) != nbytes:
                raise TensorFileError(f"tensor file {str(self.path)!r} is truncated")
        return buf

    @staticmethod
    def _tensor(buf: bytearray, dtype, shape) -> torch.Tensor:
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entry(name)
        buf = self._read_bytes(begin, end - begin)
        if self.auto_verify and self._unverified(name):
            self._check(name, zlib.crc32(buf))
        return self._tensor(buf, dtype, shape)

    def get_rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """The slice [start, stop) of dimension `dim` (0: read only those rows)."""
        dtype, shape, begin, _ = self._entry(name)
        if dim != 0:
            return self.get(name).narrow(dim, start, stop - start).contiguous()
        if self.auto_verify:
            self.verify(name)
        row = torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
        return self._tensor(self._read_bytes(begin + start * row, (stop - start) * row), dtype,
                            (stop - start, *shape[1:]))

    def shape(self, name: str) -> tuple:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]
