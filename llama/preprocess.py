"""Text files or JSONL → one token shard (see shards.py), with worker processes.

A `.jsonl` file holds one document per line (the text under `json_key`); any other file is one
document. Every document is `<s> text </s>`: packed windows learn where documents start and
end, and generation and evaluation, which prompt with BOS, see what training saw.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

from tqdm import tqdm

from llama.shards import ShardWriter
from llama.tokenizer import Tokenizer

_worker_tokenizer: Tokenizer | None = None


def iter_documents(paths, json_key: str = "text"):
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"input file {str(path)!r} does not exist")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if json_key not in record:
                            raise KeyError(f"{path}:{n} has no key {json_key!r} (choose it with --json-key)")
                        yield record[json_key]
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _init(tokenizer_path):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode(batch: list[str]):
    return [(_worker_tokenizer.encode(doc, bos=True, eos=True), len(doc.encode("utf-8"))) for doc in batch]


def _batches(docs, size: int = 64):
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def preprocess(paths, tokenizer_path, output_prefix, json_key: str = "text", workers: int = 2,
               progress: bool = True) -> dict:
    """Tokenise every document into the shard `output_prefix`; returns counts and throughput."""
    tokenizer = Tokenizer(tokenizer_path)
    writer = ShardWriter(output_prefix, tokenizer.vocab_size)
    start, n_docs, n_tokens, n_bytes = time.perf_counter(), 0, 0, 0
    bar = tqdm(desc=f"tokenising {Path(output_prefix).name}", unit="B", unit_scale=True, disable=not progress)
    docs = _batches(iter_documents(paths, json_key))
    with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(str(tokenizer_path),)) as pool:
        for encoded in pool.imap(_encode, docs, chunksize=4):
            for ids, size in encoded:
                writer.add(ids)
                n_docs, n_tokens, n_bytes = n_docs + 1, n_tokens + len(ids), n_bytes + size
                bar.update(size)
    writer.close()
    bar.close()
    seconds = time.perf_counter() - start
    return {"documents": n_docs, "tokens": n_tokens, "bytes": n_bytes, "seconds": seconds,
            "mb_per_s": n_bytes / 1e6 / seconds if seconds else float("inf")}
