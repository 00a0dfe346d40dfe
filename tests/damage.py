"""Damage a safetensors file the way a bad disk or a bad copy would: one byte of one tensor's data."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def tensor_span(path, name: str) -> tuple[int, int]:
    """[begin, end) of tensor `name`'s bytes in the file, read from its header (not through our reader)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip_byte(path, name: str, fraction: float = 0.5) -> int:
    """Invert every bit of the byte `fraction` of the way into `name`'s data; returns its file offset."""
    begin, end = tensor_span(path, name)
    at = begin + int((end - begin - 1) * fraction)
    raw = bytearray(Path(path).read_bytes())
    raw[at] ^= 0xFF
    Path(path).write_bytes(bytes(raw))
    return at


def piece(checkpoint, name: str) -> tuple[Path, str]:
    """(file, key) of the first piece of logical tensor `name` in a checkpoint of pieces (index.json)."""
    checkpoint = Path(checkpoint)
    _, _, _, file, key = json.loads((checkpoint / "index.json").read_text())["tensors"][name]["pieces"][0]
    return checkpoint / file, key


def flip_piece(checkpoint, name: str) -> tuple[Path, str]:
    """Flip a byte of the first piece of `name`; returns its (file, key)."""
    file, key = piece(checkpoint, name)
    flip_byte(file, key)
    return file, key


def drop_tensors(checkpoint, keep) -> None:
    """Rewrite index.json with only the tensors whose name `keep(name)` accepts (as if never saved)."""
    path = Path(checkpoint) / "index.json"
    index = json.loads(path.read_text())
    index["tensors"] = {n: t for n, t in index["tensors"].items() if keep(n)}
    path.write_text(json.dumps(index))
