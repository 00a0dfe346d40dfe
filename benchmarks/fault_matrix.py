"""The fault matrix of issue 15: each launcher × layout × fault, with the seconds from the fault
to the launcher's exit, against the budget of --timeout + 30 s.

    python -m benchmarks.fault_matrix [--launchers torchrun,mpirun,srun] [--layouts tp2,pp2,dp2,tp2pp2sp]
                                      [--faults kill,stop,forward,optimizer,nan,handshake] [--no-resume]

Each cell trains the tiny model under a real launcher (srun: a one-node SLURM cluster started here,
root only), makes the last rank fail at step 2 (the handshake at step 0), and checks what
tests/launcher/fault_runs.py `verdict` checks: every rank gone within --timeout + 30 s, one line
per rank naming the culprit, a non-zero exit of the launcher, and the last complete checkpoint
resuming. The ratio printed is the exit time over --timeout: the share of the budget a hang
would have taken is what the timeout saves. About 20 s a cell on 2 cores; the whole matrix 20 min.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

from tests.launcher.fault_runs import FAULTS, LAYOUTS, TIMEOUT_S, applies, run_cell, verdict
from tests.launcher.real_launchers import slurm_cluster


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launchers", default="torchrun,mpirun,srun")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--no-resume", action="store_true", help="skip resuming from the last checkpoint (faster)")
    args = p.parse_args()
    launchers = args.launchers.split(",")
    print(f"--timeout {TIMEOUT_S} s; budget {TIMEOUT_S + 30} s from the fault to the launcher's exit")
    print(f"{'launcher':>9} {'layout':>9} {'fault':>9} {'exit s':>7} {'÷timeout':>8} {'code':>5} "
          f"{'resumed':>7}  verdict")
    with contextlib.ExitStack() as stack:
        slurm = stack.enter_context(slurm_cluster(1, 16950)) if "srun" in launchers else None
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llama-faults-")))
        failed = 0
        for launcher in launchers:
            for layout in args.layouts.split(","):
                for fault in args.faults.split(","):
                    if not applies(fault, layout):
                        continue
                    cell = run_cell(launcher, layout, fault, work, slurm=slurm if launcher == "srun" else None,
                                    resume=not args.no_resume)
                    wrong = verdict(cell)
                    failed += bool(wrong)
                    t = cell.exit_after_s
                    print(f"{launcher:>9} {layout:>9} {fault:>9} {t if t is None else round(t, 1)!s:>7} "
                          f"{'' if t is None else f'{t / TIMEOUT_S:.2f}':>8} {cell.code:>5} {cell.resumed!s:>7}  "
                          f"{'; '.join(wrong) or 'ok'}", flush=True)
    print(f"{failed} cell(s) failed")


if __name__ == "__main__":
    main()
