"""What a user watching a run sees: the start-up summary (parameters counted on the real model
chunks, the layout, the batch, memory), step time in the log line and the metrics,
and `--resume` on an empty directory saying that it starts fresh."""
import json
import re

import pytest

from llama.parallelize import build_chunks
from llama.train import decays, main, startup_summary
from parallel.data_parallel import GradBuckets
from parallel.optimizer import Optimizer
from tests.distributed import run_on_ranks, topology
from tests.llama.test_train_layouts import _run_config

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
SMALL = ["--config", "tiny", "--set", "data.sources=[]", "--set", "data.tokenizer=''", "--set", "model.vocab_size=256",
         "--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "train.seq_len=16",
         "--set", "train.global_batch=4", "--set", "train.micro_batch=2", "--no-progress"]


def _summary_and_local_count(tp, pp):
    run = _run_config(tp=tp, pp=pp)
    topo = topology(tp, pp)
    chunks = build_chunks(run.model, topo, seed=0, attention="sdpa", recompute="none")
    local = sum(p.numel() for c in chunks for p in c.parameters())
    buckets = GradBuckets([p for c in chunks for p in c.parameters()], topo.dp_group, decays=decays)
    optimizer = Optimizer(buckets, topo, 1e-3, (0.9, 0.95))
    return startup_summary(run, topo, chunks, 4, buckets, optimizer), local, run.model


@pytest.mark.timeout(120)
def test_the_summary_counts_parameters_on_the_real_chunks_at_tp2_pp2():
    results = run_on_ranks(_summary_and_local_count, 4, 2, 2)
    summary, local0, model = results[0]
    total, locals_ = model.num_params(), [r[1] for r in results]
    # tp shards add up to the model, but for the RMSNorm gains, which every tp rank holds whole
    assert sum(locals_) == total + (2 - 1) * (2 * model.dim * model.n_layers + model.dim)
    counts = re.fullmatch(r"model: ([\d,]+) parameters; ([\d,]+) on rank 0, at most ([\d,]+) on a rank",
                          summary.splitlines()[0])
    assert [int(x.replace(",", "")) for x in counts.groups()] == [total, local0, max(locals_)], summary
    assert "world 4 = tp 2 x pp 2 (vpp 1, 1f1b) x dp 1" in summary
    assert "8 sequences x 16 tokens = 128 tokens per step; 4 micro-batches of 2 per dp rank" in summary
    # fp32: 4-byte weights, 4-byte gradient buckets, and the parameters are their own master
    # weights, so the optimizer keeps Adam's two 4-byte moments
    for part, per_param in (("weights", 4), ("gradients", 4), ("optimizer", 8)):
        value, unit = re.search(rf"{part} ([\d.]+) (\w+)", summary).groups()
        assert float(value) * UNITS[unit] == pytest.approx(local0 * per_param, rel=0.01), (part, summary)


def test_step_time_is_in_the_log_line_and_the_metrics(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    assert main([*SMALL, "--steps", "2", "--metrics", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"step 1 loss [\d.]+ lr \S+ grad_norm [\d.]+ step [\d.]+ s tokens/s", out), out
    assert out.startswith("model: ") and "predicted memory on rank 0" in out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(r["step_s"] > 0 for r in records)


def test_resume_on_an_empty_directory_says_it_starts_fresh(tmp_path, capsys):
    assert main([*SMALL, "--steps", "1", "--save", str(tmp_path), "--resume"]) == 0
    assert f"no checkpoint under {tmp_path} yet: starting fresh" in capsys.readouterr().out
    assert (tmp_path / "latest").is_file()
