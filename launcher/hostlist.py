"""SLURM hostlist expressions, in pure Python: `gpu[001-004,010],cpu7` → gpu001 … gpu004,
gpu010, cpu7. Zero padding is kept, several bracket groups multiply out (`r[1-2]n[01-02]`),
text may follow a group (`n[1-2]-ib`). A malformed list fails with one line naming it."""
from __future__ import annotations

import itertools
import re


class HostlistError(ValueError):
    pass


def _split_top_level(text: str, whole: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"malformed hostlist {whole!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"malformed hostlist {whole!r}: ']' without '['")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise HostlistError(f"malformed hostlist {whole!r}: '[' without ']'")
    parts.append("".join(current))
    return parts


def _expand_range(item: str, whole: str) -> list[str]:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
    if not m:
        raise HostlistError(f"malformed hostlist {whole!r}: range {item!r} is not N or N-M")
    lo, hi = m.group(1), m.group(2)
    if hi is None:
        return [lo]
    if int(hi) < int(lo):
        raise HostlistError(f"malformed hostlist {whole!r}: range {item!r} goes backwards")
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    return [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]


def expand_hostlist(text: str) -> list[str]:
    """Every host name the expression names, in order."""
    if not text or not text.strip():
        raise HostlistError(f"malformed hostlist {text!r}: empty")
    hosts = []
    for part in _split_top_level(text.strip(), text):
        if not part:
            raise HostlistError(f"malformed hostlist {text!r}: empty name between commas")
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = []
        for piece in pieces:
            if piece.startswith("["):
                inner = piece[1:-1]
                if not inner:
                    raise HostlistError(f"malformed hostlist {text!r}: empty brackets")
                choices.append([v for item in inner.split(",") for v in _expand_range(item, text)])
            elif piece:
                if re.search(r"[\[\]\s]", piece):
                    raise HostlistError(f"malformed hostlist {text!r}: unexpected character in {piece!r}")
                choices.append([piece])
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts
