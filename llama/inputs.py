"""Reading the files a user hands a command. Each problem is one InputError that names the file
(and the line, for JSON) and says what is wrong with it, rather than what Python tripped on."""
from __future__ import annotations

import json
from pathlib import Path


class InputError(ValueError):
    pass


def check_file(path, what: str = "file", error: type[ValueError] = InputError) -> Path:
    """`path` as a Path when it is a regular file; otherwise say what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    return path


def read_json(path, what: str = "JSON file"):
    path = check_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:  # a file of many lines: its line, not the character offset
        raise InputError(f"{path}:{err.lineno}: {what} is not valid JSON: {err.msg}") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {str(path)!r} is not UTF-8 text") from None


def read_jsonl(path, what: str = "JSONL file"):
    """(line number, record) for every non-blank line, streamed; a record must be a JSON object."""
    path = check_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, _record(line, f"{path}:{n}")
        except UnicodeDecodeError:
            raise InputError(f"{what} {str(path)!r} is not UTF-8 text") from None


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line.rstrip())  # no newline: a column on this line
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    return record
