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


def prose_text(max_bytes: int = 2_000_000) -> str:
    """Standard-library docstrings, separated by blank lines, up to about max_bytes."""
    parts, size = [], 0
    for path in stdlib_files():
        for doc in docstrings(path):
            parts.append(doc)
            size += len(doc) + 2
            if size >= max_bytes:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


def code_text(max_bytes: int = 2_000_000) -> str:
    parts, size = [], 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n".join(parts)
