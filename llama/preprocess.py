"""Text files or JSONL → one token shard (see shards.py), with worker processes.

A `.jsonl` file holds one document per line (the text under `json_key`); any other file is one
document. Empty documents are skipped (`<s></s>` teaches nothing) and an input without any text
is an error. Every document is `<s> text </s>`: packed windows learn where documents start and
end, and generation and evaluation, which prompt with BOS, see what training saw.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import time
from pathlib import Path

from tqdm import tqdm

from llama.inputs import InputError, check_file, read_jsonl
from llama.shards import ShardWriter
from llama.tokenizer import Tokenizer

_worker_tokenizer: Tokenizer | None = None


def iter_documents(paths, json_key: str = "text"):
    """Every non-empty document of the input files, in order; each file is checked first."""
    for path in [check_file(p, "input file") for p in paths]:
        if path.suffix == ".jsonl":
            for n, record in read_jsonl(path, "input file"):
                if not isinstance(record.get(json_key), str):
                    raise InputError(f"{path}:{n}: no text under key {json_key!r} (choose the key with --json-key)")
                if record[json_key]:
                    yield record[json_key]
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text


def documents(paths, json_key: str = "text"):
    """iter_documents, failing before anything is written when the input holds no text at all."""
    docs = iter_documents(paths, json_key)
    first = next(docs, None)
    if first is None:
        names = ", ".join(repr(str(p)) for p in paths)
        raise InputError(f"no text in {names}: the files are empty (or, in .jsonl, every {json_key!r} is)")
    return itertools.chain([first], docs)


def add_input_arguments(parser) -> None:
    """The flags that name the documents (tools/preprocess_data.py, tools/train_tokenizer.py)."""
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help=".jsonl (one document per line) or text files (one document each)")
    parser.add_argument("--json-key", default="text", help="the key of a .jsonl record that holds its text")


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
    docs = _batches(documents(paths, json_key))  # an input without text fails here, before any file exists
    writer = ShardWriter(output_prefix, tokenizer.vocab_size)
    start, n_docs, n_tokens, n_bytes = time.perf_counter(), 0, 0, 0
    bar = tqdm(desc=f"tokenising {Path(output_prefix).name}", unit="B", unit_scale=True,
               disable=None if progress else True)  # None: only on a terminal, not in logs
    try:
        with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(str(tokenizer_path),)) as pool:
            for encoded in pool.imap(_encode, docs, chunksize=4):
                for ids, size in encoded:
                    writer.add(ids)
                    n_docs, n_tokens, n_bytes = n_docs + 1, n_tokens + len(ids), n_bytes + size
                    bar.update(size)
    except BaseException:  # a bad line half-way: no partial shard left, only the error on screen
        writer.abort()
        bar.leave = False
        bar.close()
        raise
    writer.close()
    bar.close()
    seconds = time.perf_counter() - start
    return {"documents": n_docs, "tokens": n_tokens, "bytes": n_bytes, "seconds": seconds,
            "mb_per_s": n_bytes / 1e6 / seconds if seconds else float("inf")}
