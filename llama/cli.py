"""What every command shares: its help layout, and how it answers bad input: one line on stderr,
`PROG: error: <what value, what rule>`, and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import re
import sys
from contextlib import contextmanager

BAD_INPUT = 2  # the exit code of a command given something it cannot use (argparse's own)
INPUT_ERRORS = (ValueError, OSError)  # every command's checks raise ValueErrors; OSError names its file


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (its example commands keep their lines) and every flag's
    default after its help. A flag whose default is None says in its help what that means."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter, whose own errors (a flag missing, a value of the wrong type)
    are one line too: the usage it would print first is what --help shows."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.exit(fail(self.prog, f"{message} (see {self.prog} --help)"))


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def byte_size(text: str) -> int:
    """An argparse type: a size as transformers writes it (5GB = 5·10⁹ bytes, 5GiB = 5·2³⁰,
    or a number of bytes), at least one byte."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB, 2GiB or a number of bytes")
    value = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return value


def int_at_least(low: int):
    """An argparse type: an integer >= low, refused with the rule."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    return parse


def launch_rank() -> int:
    """This process's rank as its launcher tells it (0 when it cannot tell)."""
    try:
        from launcher.env import detect
        return detect().rank
    except Exception:
        return 0


def fail(prog: str, err) -> int:
    """Print the one line and return the exit code; a message that spans lines is joined.

    Before the process group exists, every rank of a job checks the same arguments and config
    and fails alike: only rank 0 prints, the others exit with the same code quietly (no wall of
    identical lines under torchrun). Afterwards an error may be one node's (a file missing
    there), so every rank prints it."""
    import torch.distributed as dist
    if launch_rank() == 0 or dist.is_initialized():
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    return BAD_INPUT


def warn(prog: str, message: str) -> None:
    print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)


def run(parser: argparse.ArgumentParser, body, argv=None, errors: tuple = ()) -> int:
    """Parse argv, then body(args) → its exit code; bad input (INPUT_ERRORS + `errors`) → one
    line and BAD_INPUT."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except INPUT_ERRORS + errors as err:
        return fail(parser.prog, err)


@contextmanager
def process_group_scope():
    """Destroy the process group started inside, on every exit path: left to interpreter
    shutdown, gloo's teardown can abort (SIGABRT) after the result was printed. A group that
    existed before (a caller's, a test's) is left alone."""
    import torch.distributed as dist
    owned = not dist.is_initialized()
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
