"""One cell of the fault matrix: train under a real launcher, make one rank fail
(`llama/fault_drill.py`), and collect what a user would see: every line the ranks printed, the
launcher's exit code, the seconds from the fault to the launcher's exit, and whether the last
complete checkpoint resumes. Used by tests/launcher/test_faults.py and benchmarks/fault_matrix.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.launcher.real_launchers import ROOT, VENV_BIN

TIMEOUT_S = 10  # --timeout of the runs: every rank must be gone within it plus 30 s
FAULT_STEP = 2
STEPS = 5
# (launcher arguments, world size); the culprit is the last rank (a later pipeline stage, tp rank 1)
LAYOUTS = {"tp2": (["--tp", "2"], 2), "pp2": (["--pp", "2"], 2), "dp2": ([], 2),
           "tp2pp2sp": (["--tp", "2", "--pp", "2", "--sp"], 4)}
FAULTS = ("kill", "stop", "forward", "optimizer", "nan", "handshake")
TRAIN = ["-m", "llama.train", "--config", "configs/tiny.yaml", "--no-progress", "--set", "data.sources=[]",
         "--set", "data.tokenizer=''", "--set", "model.vocab_size=256", "--set", "model.dim=64",
         "--set", "model.n_layers=2", "--set", "train.seq_len=32", "--set", "train.global_batch=4",
         "--set", "train.micro_batch=1", "--set", "train.warmup_steps=1", "--timeout", str(TIMEOUT_S)]


def applies(fault: str, layout: str) -> bool:
    """A handshake exists only between pipeline stages."""
    return fault != "handshake" or "pp" in layout


@dataclass
class Cell:
    launcher: str
    layout: str
    fault: str
    culprit: int
    world: int
    code: int = 0                     # the launcher's exit code
    output: str = ""                  # stdout and stderr of every rank and of the launcher
    exit_after_s: float | None = None  # from the fault to the launcher's exit
    resumed: bool | None = None       # the last complete checkpoint resumed to the end
    lines: list[str] = field(default_factory=list)  # the ranks' 'llama-train:' lines

    def lines_of(self, rank: int) -> list[str]:
        """The lines rank `rank` printed about the failure (each starts 'llama-train: rank R (host):')."""
        return [ln for ln in self.lines if ln.startswith(f"llama-train: rank {rank} (")]


def command(launcher: str, world: int, args: list[str], slurm=None) -> tuple[list[str], dict]:
    """The command line that starts `world` ranks of `python args` under `launcher`."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    py = [sys.executable, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                *args], env
    if launcher == "mpirun":
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,sm")
        mpi = str(VENV_BIN / "mpirun") if (VENV_BIN / "mpirun").exists() else "mpirun"
        return [mpi, "-n", str(world), "--oversubscribe", *py], env
    if launcher == "srun":  # --kill-on-bad-exit: the step ends when one rank fails (our sbatch templates)
        return ["srun", "-n", str(world), "--kill-on-bad-exit=1", *py], {**slurm.env, **env}
    raise ValueError(f"launcher={launcher!r} must be one of torchrun, mpirun, srun")


def run_cell(launcher: str, layout: str, fault: str, workdir: Path, slurm=None, resume: bool = True) -> Cell:
    flags, world = LAYOUTS[layout]
    cell = Cell(launcher, layout, fault, culprit=world - 1, world=world)
    save = workdir / f"{launcher}-{layout}-{fault}"
    step = 0 if fault == "handshake" else FAULT_STEP  # stages first agree (or not) at step 0
    args = [*TRAIN, *flags, "--steps", str(STEPS), "--save", str(save), "--save-every", str(FAULT_STEP),
            "--set", f"train.inject_fault={fault}@{cell.culprit}:{step}"]
    cmd, env = command(launcher, world, args, slurm)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S + 150)
    ended = time.time()
    cell.code, cell.output = proc.returncode, proc.stdout + proc.stderr
    cell.lines = [ln for ln in cell.output.splitlines() if ln.startswith("llama-train: ")]
    stamp = re.search(r"fault drill: \w+ at step \d+, time ([\d.]+)", cell.output)
    cell.exit_after_s = ended - float(stamp.group(1)) if stamp else None
    if resume and fault != "nan" and (save / "latest").is_file():
        again = [*TRAIN, *flags, "--steps", str(STEPS), "--save", str(save), "--resume"]
        cmd, env = command(launcher, world, again, slurm)
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
        cell.resumed = proc.returncode == 0 and f"at step {FAULT_STEP}" in proc.stdout + proc.stderr
        if not cell.resumed:
            cell.output += f"\n--- resume: exit {proc.returncode} ---\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return cell


def verdict(cell: Cell) -> list[str]:
    """What the cell got wrong, in words (empty: everything the issue asks for held)."""
    wrong = []
    if cell.fault == "nan":
        if cell.code != 0 or "the update was skipped" not in cell.output:
            wrong.append(f"a NaN loss must be a skipped step, not a fault: exit {cell.code}")
        return wrong
    if cell.code == 0:
        wrong.append("the launcher exited 0")
    if cell.exit_after_s is None or cell.exit_after_s > TIMEOUT_S + 30:
        wrong.append(f"exit {cell.exit_after_s} s after the fault: more than --timeout {TIMEOUT_S} + 30 s")
    if cell.fault == "handshake":
        everyone = 1 if cell.launcher == "mpirun" else cell.world  # mpirun: see below
        named = all("disagree" in ln for ln in cell.lines) and len(cell.lines) >= everyone
        if not named:
            wrong.append("not every rank named the pipeline handshake mismatch")
    else:
        for r in range(cell.world):
            lines = cell.lines_of(r)
            if r == cell.culprit:  # killed or stopped: silent; an exception: it says it failed
                ok = not lines if cell.fault in ("kill", "stop") else len(lines) == 1 and "failed during" in lines[0]
            elif not lines and cell.launcher == "mpirun" and cell.fault != "stop":
                # mpirun ends the job when a rank dies or exits non-zero: SIGKILL at once, or 0.4 s
                # after a SIGTERM, before a survivor learns of the fault; its own report names the
                # rank (README, "When a rank fails")
                ok = re.search(rf"process rank {cell.culprit} with PID|Process name: \[[^\]]*,{cell.culprit}\]",
                               cell.output) is not None
            else:
                ok = len(lines) == 1 and f"culprit rank {cell.culprit} (" in lines[0]
            if not ok:
                wrong.append(f"rank {r} did not print one line naming rank {cell.culprit}: {lines}")
    if cell.resumed is False:
        wrong.append("the last complete checkpoint did not resume")
    return wrong
