"""Metric loggers (llama/loggers.py): TensorBoard's event file, read back by TensorBoard's own
reader, holds exactly the numbers of the metrics JSONL; W&B receives the same records, offline;
a logger whose package is missing is one line before the run."""
import json
import math
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llama import train as train_module
from llama.loggers import TensorBoardLogger, WandbLogger
from llama.train import main
from tests.llama.test_train_layouts import _text
from tests.llama.test_validation import STEPS, VALIDATED, tiny_run_args, write_held_out


@pytest.fixture
def run_main(tmp_path, monkeypatch):
    """llama-train on the tiny model with validation every 2 steps and a metrics JSONL, plus
    `extra` flags; returns the JSONL's records."""
    monkeypatch.setattr(train_module, "prose_text", lambda max_bytes: _text())
    held = write_held_out(tmp_path / "held")

    def run(*extra) -> list[dict]:
        metrics = tmp_path / "metrics.jsonl"
        argv = [*tiny_run_args(), "--eval-data", held, "--eval-every", "2", "--eval-iters", "2", "--no-progress",
                "--metrics", str(metrics), *extra]
        assert main(argv) == 0
        return [json.loads(line) for line in metrics.read_text().splitlines()]
    return run


def _events(log_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _numbers(record: dict) -> dict[str, float]:
    """What the loggers must log of a JSONL record, written here apart from llama.loggers: every
    field JSON gave as a number or a boolean, as a float, the step aside (it is the x axis)."""
    return {k: float(v) for k, v in record.items() if k != "step" and type(v) in (int, float, bool)}


def test_tensorboard_holds_the_jsonl_step_by_step(run_main, tmp_path):
    records = run_main("--tensorboard-dir", str(tmp_path / "tb"))
    events = _events(tmp_path / "tb")
    want: dict[str, dict[int, float]] = {}
    for r in records:
        for name, value in _numbers(r).items():
            want.setdefault(name, {})[r["step"]] = value
    assert {"loss", "lr", "grad_norm", "val_loss", "val_ppl", "tokens_per_s", "step_s", "peak_memory_bytes",
            "skipped"} <= set(events)
    assert "mfu" not in events  # null on a CPU: no peak known
    assert sorted(events["val_loss"]) == VALIDATED and sorted(events["loss"]) == list(range(STEPS))
    assert events.keys() == want.keys()
    for name, by_step in want.items():
        assert events[name].keys() == by_step.keys(), name
        for step, value in by_step.items():  # TensorBoard keeps float32
            assert events[name][step] == np.float32(value), f"{name} at step {step}"


def test_each_step_is_on_disk_before_the_next(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    logger.write({"step": 0, "loss": 2.5, "mfu": None, "skipped": False})
    assert _events(tmp_path) == {"loss": {0: 2.5}, "skipped": {0: 0.0}}  # not closed yet
    logger.write({"step": 1, "loss": math.nan, "skipped": True})
    assert math.isnan(_events(tmp_path)["loss"][1])
    logger.close()


class _FakeWandb(types.ModuleType):
    """What the trainer uses of wandb: init(...) -> a run with log(data, step) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], False

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda data, step: self.logged.append((step, data)),
                                     finish=lambda: setattr(self, "finished", True))


def test_wandb_receives_every_record_offline(run_main, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    records = run_main("--wandb-project", "llama-tests")
    (init,) = fake.inits
    assert init["project"] == "llama-tests" and init["mode"] == "offline"
    assert init["config"]["train"]["eval_every"] == 2
    assert fake.logged == [(r["step"], _numbers(r)) for r in records] and fake.finished
    assert [step for step, data in fake.logged if "val_loss" in data] == VALIDATED
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice is wandb's to read
    WandbLogger("llama-tests", {})
    assert fake.inits[-1]["mode"] is None


@pytest.mark.parametrize("module, flag", [("wandb", "--wandb-project"), ("tensorboard", "--tensorboard-dir")])
def test_a_missing_logger_package_is_one_line_before_the_run(module, flag, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # import fails: as if not installed
    monkeypatch.setattr(train_module, "initialize", lambda *a, **k: pytest.fail("the run started"))
    assert main([*tiny_run_args(), flag, str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llama-train: error: {flag} needs {module}, which is not installed: " \
                  f"pip install 'llama-parallel[{module}]'"
