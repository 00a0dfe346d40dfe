"""Text that ships with Python, for the built-in demo: no download, same on every machine.

Two sources: prose (the docstrings of the standard library, read with `ast`, never imported)
and code (the standard library's `.py` files themselves).
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The standard library's top-level package and module files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip")
    files = sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))
    return files[:limit] if limit else files


def docstrings(path: Path) -> list[str]:
    """Every module, class and function docstring of one file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) > 40]


def prose_docs():
    """Every standard-library docstring, file by file, read lazily."""
    for path in stdlib_files():
        yield from docstrings(path)


def code_docs():
    """Every standard-library source file, read lazily."""
    for path in stdlib_files():
        yield path.read_text(encoding="utf-8", errors="replace")


def take(docs, max_bytes: int) -> list[str]:
    """Documents from `docs` until about max_bytes of text."""
    out, size = [], 0
    for doc in docs:
        out.append(doc)
        size += len(doc)
        if size >= max_bytes:
            break
    return out


def prose_text(max_bytes: int = 2_000_000) -> str:
    """Standard-library docstrings, separated by blank lines, up to about max_bytes."""
    return "\n\n".join(take(prose_docs(), max_bytes))


def write_jsonl(path: Path, docs) -> int:
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
    tmp.replace(path)
    return n


def build_demo(out_dir: str | Path, vocab_size: int = 4096, max_bytes: int = 2_000_000, workers: int = 2,
               progress: bool = True) -> dict:
    """The demo's two sources, its tokenizer and its shards, from nothing but Python itself:

        OUT/prose.jsonl, OUT/code.jsonl      one document per docstring / per stdlib file
        OUT/prose-valid.jsonl                every 20th docstring, held out for evaluation
        OUT/tokenizer.model                  SentencePiece BPE trained on the training text
        OUT/prose.{bin,idx}, OUT/code.{bin,idx}, OUT/prose-valid.{bin,idx}
    """
    from llama.preprocess import preprocess
    from llama.tokenizer import train_tokenizer

    out = Path(out_dir)
    prose = take(prose_docs(), max_bytes)
    code = take(code_docs(), max_bytes)
    train_prose = [d for i, d in enumerate(prose) if i % 20 != 19]
    write_jsonl(out / "prose.jsonl", train_prose)
    write_jsonl(out / "prose-valid.jsonl", prose[19::20])
    write_jsonl(out / "code.jsonl", code)
    tokenizer = train_tokenizer(train_prose + code, out / "tokenizer", vocab_size=vocab_size)
    stats = {name: preprocess([out / f"{name}.jsonl"], tokenizer, out / name, workers=workers, progress=progress)
             for name in ("prose", "code", "prose-valid")}
    return {"tokenizer": str(tokenizer), **stats}

