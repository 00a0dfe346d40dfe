"""Where rank 0's step records go besides the JSONL: TensorBoard (`--tensorboard-dir`) and
Weights & Biases (`--wandb-project`).

Every numeric field of a record becomes a scalar at global step `step` (loss, lr, grad_norm,
val_loss and val_ppl when validated, tokens/s, step time, mfu when known, memory, skipped as
0/1); a field that is None (mfu without a known peak) is left out. TensorBoard's event file is
flushed after every step, so a crash loses at most the step being written. W&B runs offline
(`wandb sync` uploads later) unless WANDB_MODE says otherwise.
"""
from __future__ import annotations

import importlib
import os

# package -> (its flag, the modules the logger imports: torch's writer checks tensorboard's version)
NEEDS = {"tensorboard": ("--tensorboard-dir", ["tensorboard", "torch.utils.tensorboard"]),
         "wandb": ("--wandb-project", ["wandb"])}


class LoggerError(ValueError):
    """A logger was asked for but its package is not installed."""


def check_installed(tensorboard_dir: str | None, wandb_project: str | None) -> None:
    """Fail with one line, before the run starts, when a requested logger cannot be imported."""
    for package, wanted in (("tensorboard", tensorboard_dir), ("wandb", wandb_project)):
        if not wanted:
            continue
        flag, modules = NEEDS[package]
        try:
            for module in modules:
                importlib.import_module(module)
        except ImportError:
            raise LoggerError(f"{flag} needs {package}, which is not installed: "
                              f"pip install 'llama-parallel[{package}]'") from None


def scalars(record: dict) -> dict[str, float]:
    """The record's numeric fields but the step, as floats (booleans as 0/1)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoardLogger:
    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run hides what the crashed one logged past its checkpoint
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def write(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, project: str, config: dict):
        import wandb
        mode = None if os.environ.get("WANDB_MODE") else "offline"  # None: wandb reads WANDB_MODE itself
        self.run = wandb.init(project=project, config=config, mode=mode)

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_loggers(tensorboard_dir: str | None, wandb_project: str | None, config: dict,
                 first_step: int = 0) -> list:
    """The requested loggers, for rank 0 (a resumed run passes the step it resumes at)."""
    loggers: list = []
    if tensorboard_dir:
        loggers.append(TensorBoardLogger(tensorboard_dir, purge_step=first_step or None))
    if wandb_project:
        loggers.append(WandbLogger(wandb_project, config))
    return loggers
