"""When one rank fails, every rank ends, and each names the rank that failed, not one that noticed.

At 2048 GPUs a hung job is the most expensive failure, and the first error in the logs is
usually a survivor's ("Connection closed by peer", "Timed out waiting"), not the culprit's.
Three things end a job and explain it:
- every process group has the job's timeout (`parallel.topology`), so a collective or p2p
  waiting for a dead or stuck peer raises within `--timeout` instead of waiting for ever;
- each rank runs a heartbeat thread that writes into the job's store (the rendezvous' TCPStore)
  its host and what it is doing ("step 3: forward/backward"), when that changes (at most once a
  tick) and every `interval` seconds. A survivor that hits an error asks every rank to answer
  (it raises a counter in the store); live heartbeat threads answer within a tick. A rank killed
  (SIGKILL), stopped (SIGSTOP) or wedged with the GIL held does not answer: its silence names
  it, and its last beat says what it was doing. No clocks are compared across hosts;
- a rank whose own code raised (anything but a communication error) records itself in the store
  as the first failure before it exits.
The culprit is the recorded first failure if there is one, else the ranks that did not answer;
a store that cannot be reached means its host, rank 0, is gone. Each rank prints one line and
exits non-zero; a rank its launcher stops with SIGTERM (torchrun, srun and mpirun do, once one
rank has failed) prints its line too, from the heartbeat thread, before it exits. Any rank dumps
its Python stacks (`faulthandler`) on `kill -USR2 PID` (USR1 is the trainer's stop-and-save
signal), and a rank whose heartbeat thread cannot run for --timeout (the GIL held by wedged native
code) dumps them and exits.

Store traffic: one small request per rank and tick (a quarter of the interval: 2.5 s at the
default --timeout of 600 s), plus a write per phase change at most once a tick: under 1 request
per rank and second, under 2k/s at 2048 ranks, well within what the TCPStore serves.
A rank stopped with SIGSTOP cannot exit, and launchers wait 30 s after their SIGTERM before
SIGKILL: a survivor on the same host ends it (only a process in state T, read from /proc).
"""
from __future__ import annotations

import datetime
import faulthandler
import io
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch.distributed as dist

_PREFIX = "llama/fault/"
_FIRST, _ASK = _PREFIX + "first", _PREFIX + "ask"
_phase = "starting"
_heartbeat: Heartbeat | None = None
_main_store = None
_report_lock = threading.Lock()  # one line per rank: the main thread's or the SIGTERM one's
# Launchers differ in the grace they give after SIGTERM: torchrun and srun 30 s, mpirun (PRRTE)
# about 0.4 s. Hence the first verdict is recorded in the store, and later reporters read it.
_PARALLEL_DIR = str(Path(__file__).resolve().parent.parent / "parallel")
# Substrings of the errors gloo, NCCL and the store raise when a peer, not this rank, went away.
_PEER_ERRORS = ("Connection closed by peer", "Connection reset", "Broken pipe", "Timed out waiting",
                "timed out", "Timeout", "NCCL", "Socket", "monitoredBarrier", "pair closure")


def set_phase(text: str) -> None:
    """What this rank is doing, for its heartbeat (an assignment: cheap on the hot path)."""
    global _phase
    _phase = text


def say(line: str) -> None:
    """Write one line to stderr in one system call: ranks share the launcher's pipe, and print()'s
    separate write of the newline would let another rank's line land in the middle of ours."""
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (AttributeError, OSError, io.UnsupportedOperation):  # a stderr in memory (pytest)
        print(line, file=sys.stderr, flush=True)


def own_failure(rank: int, err: BaseException) -> str:
    """How a rank's own failure is recorded and named: 'rank R (host) failed during PHASE: ERROR'."""
    return f"rank {rank} ({host()}) failed during {_phase}: {_first_line(err)}"


def record_own_failure(rank: int, err: BaseException) -> None:
    """Record this rank's failure as the job's first, unless one is recorded already (best effort)."""
    try:
        _store().compare_set(_FIRST, "", own_failure(rank, err))
    except Exception:
        pass


def host() -> str:
    return socket.gethostname()


def interval_for(timeout_s: float) -> float:
    """Heartbeat period when nothing changes: a tenth of the timeout, within [1, 10] s."""
    return min(10.0, max(1.0, timeout_s / 10))


def tick_for(timeout_s: float) -> float:
    """How often the heartbeat looks for a question: a quarter of the interval (0.25–2.5 s)."""
    return interval_for(timeout_s) / 4


def _connect(timeout_s: float = 3.0):
    """A connection of our own to the job's store, with a short timeout (never hang here). Made
    while the store is up: connecting later to a dead store retries for the job's timeout."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:
        return None
    try:
        store = store.clone()
    except Exception:  # stores without clone (FileStore: a local file) are shared as they are
        return store
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return store


def _store():
    """The main thread's connection, made by start() (the heartbeat thread has its own)."""
    global _main_store
    if _main_store is None:
        _main_store = _connect()
    return _main_store


class Heartbeat:
    """A daemon thread that beats [host, phase, last question answered] into the store, answers
    a survivor's question within a tick, and reports for its rank when the launcher sends SIGTERM."""

    def __init__(self, rank: int, world: int, interval: float, prog: str, timeout_s: float):
        self.rank, self.world, self.interval = rank, world, interval
        self.prog, self.timeout_s = prog, timeout_s
        self.tick = tick_for(timeout_s)
        self.host = host()
        self.store = _connect()
        self.stop_event = threading.Event()
        self.answered = 0
        self.wake_r, self.wake_w = os.pipe()  # SIGTERM's C-level handler writes here
        os.set_blocking(self.wake_w, False)
        self.thread = threading.Thread(target=self._run, name="llama-heartbeat", daemon=True)

    def beat(self, state: str | None = None) -> None:
        record = [self.host, os.getpid(), state or _phase, self.answered]
        self.store.set(f"{_PREFIX}beat/{self.rank}", json.dumps(record))

    def _run(self) -> None:
        last, last_phase = time.monotonic(), _phase
        while not self.stop_event.is_set():
            if select.select([self.wake_r], [], [], self.tick)[0]:
                woke = os.read(self.wake_r, 64)  # signal numbers (set_wakeup_fd), or 0 from stop()
                if signal.SIGTERM in woke:
                    self._terminated()
                if signal.SIGTERM in woke or 0 in woke:
                    return
            # The watchdog: a rank whose heartbeat cannot run for a timeout (the GIL held by wedged
            # native code) dumps its stacks and exits, from faulthandler's own C thread.
            faulthandler.dump_traceback_later(self.timeout_s + self.interval, exit=True)
            try:
                asked = int(self.store.add(_ASK, 0))
                if asked != self.answered or _phase != last_phase or time.monotonic() - last >= self.interval:
                    self.answered, last, last_phase = asked, time.monotonic(), _phase
                    self.beat()
            except Exception:  # the store (rank 0) is gone: the survivors' lines say so
                if self.stop_event.is_set():
                    return
                time.sleep(self.tick)

    def _terminated(self) -> None:
        """The launcher stopped this rank (another one failed): say who failed, then exit 143."""
        who = culprit(None, self.rank, self.world, self.timeout_s, self.store)  # at once when already known
        if _report_lock.acquire(blocking=False):  # else the main thread has just printed its line
            say(f"{self.prog}: rank {self.rank} ({self.host}): culprit {who}; this rank was stopped by its "
                f"launcher (SIGTERM) during {_phase}")
            faulthandler.cancel_dump_traceback_later()
            try:
                self.beat("exited: stopped by the launcher")
            finally:
                os._exit(128 + signal.SIGTERM)

    def start(self) -> Heartbeat:
        self.beat()  # the first beat before any collective, so every rank is known at once
        signal.signal(signal.SIGTERM, lambda *_: None)  # the thread acts on it, through the pipe
        signal.set_wakeup_fd(self.wake_w)
        self.thread.start()
        return self

    def stop(self, state: str) -> None:
        """End the thread first (the store connection is not shared between threads), then beat."""
        self.stop_event.set()
        os.write(self.wake_w, b"\0")
        self.thread.join(timeout=10)
        faulthandler.cancel_dump_traceback_later()
        try:
            self.beat(state)
        except Exception:
            pass


def start(rank: int, world: int, timeout_s: float, prog: str = "llama-train") -> None:
    """Arm fault reporting for this rank: stacks on fatal signals and SIGUSR2, the heartbeat."""
    global _heartbeat
    try:  # needs a real stderr (not one captured in memory, as under pytest)
        faulthandler.enable(all_threads=True)
        if hasattr(signal, "SIGUSR2"):  # USR1 belongs to preemption (llama/preemption.py)
            faulthandler.register(signal.SIGUSR2, all_threads=True)
    except (ValueError, AttributeError, OSError, io.UnsupportedOperation):
        pass
    if world > 1 and _heartbeat is None and _store() is not None:  # both connections made now
        _heartbeat = Heartbeat(rank, world, interval_for(timeout_s), prog, timeout_s).start()


def stop(state: str = "exited") -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop(state)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _heartbeat = None


def is_peer_failure(err: BaseException | None) -> bool:
    """Whether `err` says a peer (or the store) went away, rather than this rank's own fault."""
    if err is None or isinstance(err, dist.DistError):
        return True
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, (RuntimeError, ConnectionError, TimeoutError)) and any(s in text for s in _PEER_ERRORS)


def waiting_in(err: BaseException, group_names: dict) -> str:
    """The innermost frame of `parallel/` in the traceback (what this rank was waiting in), and
    the process group it used when a frame there holds one."""
    frames = [f for f, _ in traceback.walk_tb(err.__traceback__) if f.f_code.co_filename.startswith(_PARALLEL_DIR)]
    if not frames:
        return "its own code"
    inner = frames[-1]
    where = f"{Path(inner.f_code.co_filename).stem}.{inner.f_code.co_name}"
    for f in reversed(frames):
        group = f.f_locals.get("group", getattr(f.f_locals.get("self"), "group", None))
        if group is not None and group_names.get(id(group)):
            return f"{where} on the {group_names[id(group)]} group"
    return where


def _first_line(err: BaseException) -> str:
    """The error's first sentence, without gloo's source location and advice."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text).split(". ")[0]
    return f"{type(err).__name__}: {text}".rstrip(": ")


def _roll_call(store, world: int, timeout_s: float, me: int) -> tuple[list, list]:
    """Ask every rank to answer and wait 2.5 ticks (live heartbeats answer within one). Returns
    (silent, busy): the ranks other than `me` that did not answer and have not exited, as (rank,
    host, pid, last phase), and the ranks that answered but have not exited yet."""
    question = int(store.add(_ASK, 1))
    time.sleep(2.5 * tick_for(timeout_s))
    keys = [f"{_PREFIX}beat/{r}" for r in range(world)]
    try:
        values = store.multi_get(keys)
    except Exception:  # a key is missing: a rank that died before its first beat
        values = [store.get(k) if store.check([k]) else None for k in keys]
    silent, busy = [], []
    for r, raw in enumerate(values):
        where, pid, what, answered = json.loads(raw) if raw else ("?", 0, "before its first heartbeat", -1)
        if r == me or what.startswith("exited"):
            continue
        (busy if answered >= question else silent).append((r, where, pid, what))
    return silent, busy


def _recorded_first(store) -> str | None:
    return store.get(_FIRST).decode() or None if store.check([_FIRST]) else None


def culprit(err: BaseException | None, rank: int, world: int, timeout_s: float, store=None) -> str:
    """Who failed, in words, as seen from this rank after `err` (None: the launcher stopped us)."""
    own = not is_peer_failure(err)
    store = store or _store()
    if store is None:
        return own_failure(rank, err) if own else "unknown (no store)"
    try:
        # Alive and reporting: answers every question, so no survivor names this rank.
        store.set(f"{_PREFIX}beat/{rank}", json.dumps([host(), os.getpid(), f"reporting during {_phase}", 1 << 62]))
        if own:
            store.compare_set(_FIRST, "", own_failure(rank, err))
        first = _recorded_first(store)
        if first:
            return first
        silent, _ = _roll_call(store, world, timeout_s, rank)
        first = _recorded_first(store)  # a rank that raised while we asked
        if first:
            return first
    except Exception:  # the store lives on rank 0: unreachable means rank 0 is gone
        return f"rank 0 (the store's host) is unreachable: dead or stuck (seen during {_phase})"
    if not silent:
        return "no rank went silent: a communication failure between live ranks"
    for _, where, pid, _ in silent:
        if where == host():
            _kill_if_stopped(pid)
    named = "; ".join(f"rank {r} ({h}) did not answer, last seen during {what}" for r, h, _, what in silent[:4])
    named += f" and {len(silent) - 4} more" if len(silent) > 4 else ""
    try:  # the verdict, for the ranks that report after us: they need not ask again
        store.compare_set(_FIRST, "", named)
    except Exception:
        pass
    return named


def _kill_if_stopped(pid: int) -> None:
    """A silent rank on this host that is stopped (state T, e.g. SIGSTOP) can never exit by itself,
    and launchers give a rank 30 s after SIGTERM before SIGKILL: end it now."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass


def failure_line(prog: str, err: BaseException, rank: int, world: int, timeout_s: float,
                 group_names: dict | None = None) -> str:
    """The one line a failing rank prints: who it is, the culprit, then what this rank saw."""
    who = culprit(err, rank, world, timeout_s)
    me = f"{prog}: rank {rank} ({host()})"
    if not is_peer_failure(err):
        if who.startswith(f"rank {rank} ("):
            return f"{me}: {who.split(') ', 1)[1]}"
        return f"{me}: culprit {who}; this rank then failed during {_phase}: {_first_line(err)}"
    where = waiting_in(err, group_names or {})
    return f"{me}: culprit {who}; this rank stopped while waiting in {where} during {_phase}: {_first_line(err)}"


def hosts_the_store(rank: int) -> bool:
    """Rank 0 serves the job's TCPStore, unless torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE)."""
    return rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def linger_for_reporters(rank: int, world: int, timeout_s: float) -> None:
    """On the rank that serves the store, after its own line: keep the store up until every other
    rank has exited or gone silent (dead), so no survivor mistakes rank 0's exit for the fault.
    At most --timeout + 5 s (a survivor still waiting in a collective reports by then), and 1 s
    after the launcher's SIGTERM (the other ranks, stopped too, read the recorded culprit in that
    second). Only there: every other rank exits at once, since its exit is what makes the peers
    still waiting on it fail at once (gloo's process groups cannot be aborted, and closing their
    sockets by hand makes gloo abort the process)."""
    if not hosts_the_store(rank) or world == 1 or (store := _store()) is None:
        return
    deadline = time.monotonic() + timeout_s + 5

    def terminated(*_):
        nonlocal deadline
        deadline = min(deadline, time.monotonic() + 1.0)
    signal.signal(signal.SIGTERM, terminated)
    try:
        while time.monotonic() < deadline and _roll_call(store, world, timeout_s, rank)[1]:
            pass  # some rank still alive has not printed its line yet
    except Exception:
        return


def report(line: str) -> None:
    """Print this rank's one line, unless the SIGTERM path printed one already (then wait for it
    to end the process)."""
    _report_lock.acquire()
    say(line)


def group_names(topo) -> dict:
    """id(process group) → its name in the layout, for `waiting_in`."""
    named = [("tp", topo.tp_group), ("pp", topo.pp_group), ("dp", topo.dp_group), ("tp×pp", topo.mp_group),
             ("world", topo.world_group)]
    return {id(g): name for name, g in reversed(named) if g is not None}
