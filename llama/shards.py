"""Token shards on disk: `PREFIX.bin`, every document's token ids back to back (uint16 when the
vocabulary is below 65536, else uint32), and `PREFIX.idx`, a header and the document offsets.

    .idx = b"LLAMAIDX" | version u32 | bytes per token u32 | vocab_size u64 | max_token_id u64 |
           n_docs u64 | offsets (n_docs + 1) × u64, in tokens

A fine-tuning shard (llama/sft.py) also has `PREFIX.mask`: one uint8 per token, 1 where the
token is a trained target (a response's tokens and its EOS), 0 where it is not (BOS, prompts,
role headers). Its documents are the examples. A shard with a mask is read as whole examples
packed into sequences (llama/data.py, `PackedExamples`), one without as windows of text.

Both files are written under temporary names and renamed when complete (.idx last), so a
shard that exists is whole; a truncated or foreign one is refused with its file named.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC, VERSION = b"LLAMAIDX", 1
_HEADER = struct.Struct("<8sIIQQQ")


class ShardError(ValueError):
    pass


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65536 else np.uint32


class ShardWriter:
    def __init__(self, prefix: str | Path, vocab_size: int, with_mask: bool = False):
        self.prefix, self.vocab_size = Path(prefix), vocab_size
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.tmp_bin = Path(f"{self.prefix}.bin.tmp")
        self.file = open(self.tmp_bin, "wb")
        self.tmp_mask = Path(f"{self.prefix}.mask.tmp")
        self.mask_file = open(self.tmp_mask, "wb") if with_mask else None
        self.offsets, self.max_id = [0], 0

    def add(self, ids, mask=None) -> None:
        """One document; `mask` (a shard written with_mask): 1 per trained token, else 0."""
        if (mask is None) != (self.mask_file is None):
            raise ValueError("a shard written with_mask takes a mask with every document, and only then")
        if mask is not None:
            if len(mask) != len(ids):
                raise ValueError(f"{len(ids)} tokens but {len(mask)} mask entries")
            self.mask_file.write(np.asarray(mask, dtype=np.uint8).tobytes())
        arr = np.asarray(ids, dtype=np.int64)
        if len(arr):
            self.max_id = max(self.max_id, int(arr.max()))
            if arr.min() < 0 or self.max_id >= self.vocab_size:
                raise ShardError(f"token id {self.max_id} outside the vocabulary of {self.vocab_size} "
                                 f"while writing {self.prefix}.bin")
        self.file.write(arr.astype(self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(arr))

    def abort(self) -> None:
        """Stop and remove what was written: a failed run leaves no shard, whole or partial."""
        self.file.close()
        self.tmp_bin.unlink(missing_ok=True)
        if self.mask_file is not None:
            self.mask_file.close()
            self.tmp_mask.unlink(missing_ok=True)

    def close(self) -> None:
        self.file.close()
        tmp_idx = Path(f"{self.prefix}.idx.tmp")
        with open(tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, np.dtype(self.dtype).itemsize, self.vocab_size, self.max_id,
                                 len(self.offsets) - 1))
            f.write(np.asarray(self.offsets, dtype=np.uint64).tobytes())
        self.tmp_bin.replace(f"{self.prefix}.bin")
        if self.mask_file is not None:
            self.mask_file.close()
            self.tmp_mask.replace(f"{self.prefix}.mask")
        else:  # a mask left by an earlier fine-tuning shard of this name would not be this one's
            Path(f"{self.prefix}.mask").unlink(missing_ok=True)
        tmp_idx.replace(f"{self.prefix}.idx")


class Shard:
    """A memory-mapped shard: `tokens` (all documents, flat) and document `offsets`."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for f in (idx, bin_):
            if not f.is_file():
                raise ShardError(f"shard file {str(f)!r} does not exist: build it with tools/preprocess_data.py "
                                 "(the demo's: python tools/build_demo_corpus.py --out data/demo)")
        raw = idx.read_bytes()
        if len(raw) < _HEADER.size or raw[:8] != MAGIC:
            raise ShardError(f"{str(idx)!r} is not a token-shard index (bad header)")
        _, version, itemsize, self.vocab_size, self.max_token_id, n_docs = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise ShardError(f"{str(idx)!r} has format version {version}; this code reads {VERSION}")
        if len(raw) != _HEADER.size + 8 * (n_docs + 1):
            raise ShardError(f"{str(idx)!r} is truncated: {len(raw)} bytes for {n_docs} documents")
        self.offsets = np.frombuffer(raw, dtype=np.uint64, offset=_HEADER.size)
        dtype = {2: np.uint16, 4: np.uint32}.get(itemsize)
        expected = int(self.offsets[-1]) * itemsize
        if dtype is None or bin_.stat().st_size != expected:
            raise ShardError(f"{str(bin_)!r} is truncated or foreign: {bin_.stat().st_size} bytes, the index "
                             f"says {expected}")
        self.tokens = np.memmap(bin_, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
        self.loss_mask = None  # a fine-tuning shard's: 1 per trained target token
        mask = Path(f"{prefix}.mask")
        if mask.is_file():
            if mask.stat().st_size != self.n_tokens:
                raise ShardError(f"{str(mask)!r} has {mask.stat().st_size} entries for {self.n_tokens} tokens: "
                                 "it belongs to another shard, or is truncated; rebuild it with "
                                 "tools/preprocess_data.py --format sft")
            self.loss_mask = np.memmap(mask, dtype=np.uint8, mode="r") if self.n_tokens else np.zeros(0, np.uint8)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def check_vocab(self, vocab_size: int) -> None:
        if self.max_token_id >= vocab_size:
            raise ShardError(f"shard {str(self.prefix)!r} holds token id {self.max_token_id}, outside "
                             f"model.vocab_size={vocab_size}")
