"""Text files or JSONL → one token shard (see shards.py), with worker processes.

A `.jsonl` file holds one document per line (the text under `json_key`); any other file is one
document. Empty documents are skipped (`<s></s>` teaches nothing) and an input without any text
is an error. Every document is `<s> text </s>`: packed windows learn where documents start and
end, and generation and evaluation, which prompt with BOS, see what training saw.

`fmt="sft"` (`--format sft`): the inputs are fine-tuning JSONL (llama/sft.py: prompt/response or
messages records); each record is rendered by the template to tokens and a loss mask, and the
shard gets PREFIX.mask beside PREFIX.bin (llama/shards.py), one document per example.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import time
from pathlib import Path

from tqdm import tqdm

from llama import sft
from llama.inputs import InputError, check_file, read_jsonl
from llama.shards import ShardWriter
from llama.tokenizer import Tokenizer

_worker_tokenizer: Tokenizer | None = None
FORMATS = ("text", "sft")


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


def iter_examples(paths):
    """(where, record) of every fine-tuning record of the .jsonl inputs, each checked first."""
    for path in [check_file(p, "input file") for p in paths]:
        if path.suffix != ".jsonl":
            raise InputError(f"{str(path)!r}: fine-tuning input must be .jsonl (prompt/response or messages records)")
        for n, record in read_jsonl(path, "input file"):
            sft.messages_of(record, f"{path}:{n}")
            yield f"{path}:{n}", record


def examples(paths):
    """iter_examples, failing before anything is written when the inputs hold no record."""
    records = iter_examples(paths)
    first = next(records, None)
    if first is None:
        raise InputError(f"no fine-tuning records in {', '.join(repr(str(p)) for p in paths)}")
    return itertools.chain([first], records)


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


def _encode_sft(batch: list[tuple[str, dict]]):
    """(ids, mask, bytes of text) of each record."""
    out = []
    for where, record in batch:
        ids, mask = sft.render(record, _worker_tokenizer, where)
        out.append((ids, mask, sum(len(t["content"].encode("utf-8")) for t in sft.messages_of(record, where))))
    return out


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
               progress: bool = True, fmt: str = "text") -> dict:
    """Tokenise every document into the shard `output_prefix`; returns counts and throughput.
    fmt: "text" (documents) or "sft" (fine-tuning records: tokens and a loss mask)."""
    if fmt not in FORMATS:
        raise InputError(f"format {fmt!r} is not one of {FORMATS}")
    tokenizer = Tokenizer(tokenizer_path)
    tuning = fmt == "sft"
    if tuning:
        sft.render({"prompt": "", "response": ""}, tokenizer)  # a tokenizer without EOS fails here
    # an input without text fails here, before any file exists
    docs = _batches(examples(paths) if tuning else documents(paths, json_key))
    writer = ShardWriter(output_prefix, tokenizer.vocab_size, with_mask=tuning)
    start, n_docs, n_tokens, n_bytes, n_trained = time.perf_counter(), 0, 0, 0, 0
    bar = tqdm(desc=f"tokenising {Path(output_prefix).name}", unit="B", unit_scale=True,
               disable=None if progress else True)  # None: only on a terminal, not in logs
    try:
        with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(str(tokenizer_path),)) as pool:
            for encoded in pool.imap(_encode_sft if tuning else _encode, docs, chunksize=4):
                for ids, *mask, size in encoded:
                    writer.add(ids, *mask)
                    n_docs, n_tokens, n_bytes = n_docs + 1, n_tokens + len(ids), n_bytes + size
                    n_trained += sum(mask[0]) if mask else len(ids)
                    bar.update(size)
    except BaseException:  # a bad line half-way: no partial shard left, only the error on screen
        writer.abort()
        bar.leave = False
        bar.close()
        raise
    writer.close()
    bar.close()
    seconds = time.perf_counter() - start
    return {"documents": n_docs, "tokens": n_tokens, "trained_tokens": n_trained, "bytes": n_bytes, "seconds": seconds,
            "mb_per_s": n_bytes / 1e6 / seconds if seconds else float("inf")}
