"""`llama-train --dry-run`: rank R's set-up of an N-rank job on one CPU. Checked against figures
obtained another way: parameter counts from LlamaConfig's shapes, groups from the rank-order
rule, memory from the start-up summary of a real run, traffic from `parallel.comm`'s counters
after a real step on 4 gloo ranks, errors from the real start-up's checks."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.env import LaunchEnv
from launcher.init import initialize
from llama.config import load_config
from llama.demo_corpus import prose_text
from llama.dry_run import dry_run, step_traffic, traffic_totals
from llama.fake_world import fake_world
from llama.setup import build_rank, memory_breakdown
from llama.train import ByteDemoData, main, startup_summary, train
from parallel import comm
from parallel.pipeline.partition import chunks_of_rank
from parallel.topology import TopologyError, build_topology
from tests.distributed import run_on_ranks, topology
from tests.llama.test_train_layouts import _run_config

ROOT = Path(__file__).resolve().parents[2]


def sbatch_layout(name: str) -> list[str]:
    """The LAYOUT=( ... ) flags of an sbatch template: the test runs exactly the job's layout."""
    text = (ROOT / "launcher" / "slurm" / name).read_text()
    body = re.search(r"^LAYOUT=\((.*?)\)", text, re.S | re.M).group(1)
    return body.split()


def _blocks(out: str) -> dict[int, str]:
    return {int(re.match(r"rank (\d+) of", b).group(1)): b for b in out.split("\n\n") if b.startswith("rank ")}


def _expected_params(cfg, tp: int, layers: int, embedding: bool, head: bool) -> int:
    """From the config's shapes: wq, wk, wv, wo (dim²) and w1, w2, w3 (dim·ffn) split over tp,
    two RMSNorm gains whole; the embedding and the head split by vocabulary, the final norm whole."""
    per_layer = (4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim) // tp + 2 * cfg.dim
    return layers * per_layer + embedding * cfg.vocab_size * cfg.dim // tp + head * (cfg.vocab_size * cfg.dim // tp
                                                                                     + cfg.dim)


@pytest.mark.timeout(60)
def test_the_65b_sbatch_layout_at_2048_ranks(capsys):
    layout = sbatch_layout("llama-65b.sbatch")
    start = time.perf_counter()
    code = main([*layout, "--dry-run", "--world-size", "2048", "--rank", "0", "1023", "2047", "--gpus-per-node", "8"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0 and elapsed < 20, (code, elapsed)
    blocks = _blocks(out)
    assert sorted(blocks) == [0, 1023, 2047]
    cfg = load_config("llama-65b").model
    for rank, block in blocks.items():
        pp_rank = rank // (8 * 64)
        chunks = chunks_of_rank(cfg.n_layers, 4, pp_rank, 5)
        want = _expected_params(cfg, 8, sum(len(c.layer_ids) for c in chunks), pp_rank == 0, pp_rank == 3)
        assert f"parameters: {want:,} on this rank" in block, block
        for i, chunk in enumerate(chunks):
            assert f"chunk {i}: layers {chunk.layer_ids[0]}..{chunk.layer_ids[-1]}" in block
    assert _expected_params(cfg, 8, 20, False, False) == 2_024_079_360  # rank 1337's, measured in DESIGN.md
    b = blocks[1023]
    assert "rank 1023 of 2048 (node 127 at 8 per node): tp rank 7, dp rank 63, pp rank 1" in b
    assert "tp group (8): ranks 1016..1023; node 127" in b
    assert "pp group (4): ranks 511..2047 step 512; nodes 63..255 step 64" in b  # 1023 ± 512·k
    assert "dp group (64): ranks 519..1023 step 8; nodes 64..127" in b
    assert "warning" not in out


@pytest.mark.timeout(30)
def test_a_tp_group_across_nodes_is_a_warning_in_the_dry_run(capsys):
    layout = sbatch_layout("llama-65b.sbatch")
    assert main([*layout, "--dry-run", "--world-size", "2048", "--rank", "5", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "warning: 256 tp groups span nodes at 4 ranks per node (ranks 0-7 on nodes 0-1;" in out
    assert "tp group (8): ranks 0..7; nodes 0, 1" in out


def _real_step(tp, pp, kw):
    """On a rank: one real training step's traffic counters, and its set-up's memory (the start-up
    summary's and memory_breakdown's of the real tensors)."""
    run = _run_config(tp=tp, pp=pp, steps=1, **kw)
    topo = topology(tp, pp)
    real = build_rank(run, topo, torch.device("cpu"))
    summary = startup_summary(run, topo, real.chunks, real.accumulation, real.buckets, real.optimizer)
    comm.reset_traffic()
    train(run, topo, show_progress=False, data=ByteDemoData(16, 0, prose_text(max_bytes=40_000)))
    return dict(comm.TRAFFIC), dict(comm.CALLS), memory_breakdown(run, topo, real), summary


LAYOUTS = [(2, 2, dict(sp=True, recompute="selective")),
           (2, 2, dict(recompute="full")),
           (2, 1, dict(sp=True, distributed_optimizer=True, dtype="bf16")),
           (1, 2, dict(schedule="interleaved", vpp=2, distributed_optimizer=True)),
           (2, 2, dict(model={"n_kv_heads": 1}, recompute="selective")),  # kv-head copies
           (1, 2, dict(model={"tie_word_embeddings": True}, distributed_optimizer=True))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp, pp, kw", LAYOUTS, ids=[f"tp{a}-pp{b}-{'-'.join(c)}" for a, b, c in LAYOUTS])
def test_dry_run_figures_equal_a_real_runs(tp, pp, kw):
    results = run_on_ranks(_real_step, 4, tp, pp, kw)
    run = _run_config(tp=tp, pp=pp, steps=1, **kw)
    for rank, (traffic, calls, memory, _) in enumerate(results):
        with fake_world(4, rank):
            topo = build_topology(tp, pp)
            setup = build_rank(run, topo, torch.device("meta"), seed=None)
            assert memory_breakdown(run, topo, setup) == memory
            assert traffic_totals(step_traffic(run, topo, setup)) == (traffic, calls), rank
    # what the dry run prints for rank 0 is what the real start-up printed
    printed = re.search(r"predicted memory on rank 0: (.*)\)", results[0][3]).group(1)
    assert f"memory: {printed}, predicted)" in _blocks(dry_run(run, 4, [0]))[0]


def _error_line(argv) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-m", "llama.train", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()], proc.stdout


@pytest.mark.timeout(90)
def test_a_bad_layout_fails_as_the_real_start_up_does():
    layout = [*sbatch_layout("llama-65b.sbatch"), "--pp", "3"]
    with pytest.raises(TopologyError) as real:  # the launcher's first check, before any process group
        initialize(8, 3, None, env=LaunchEnv(rank=0, world_size=2048))
    code, err, out = _error_line([*layout, "--dry-run", "--world-size", "2048"])
    assert (code, err, out) == (2, [f"llama-train: error: {real.value}"], "")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flags, want", [
    (["--tp", "8"], "n_heads=4 is not divisible by tp=8"),
    (["--tp", "2", "--set", "train.global_batch=30", "--set", "train.micro_batch=4"],
     "global_batch=30 is not divisible by micro_batch*dp=4*4"),
    (["--tp", "2", "--pp", "2", "--set", "model.n_layers=3"], "n_layers=3 is not divisible by pp*vpp=2*1=2"),
])
def test_config_errors_match_the_trainers(flags, want, capsys):
    """The dry run's checks are the trainer's own (llama.setup.check_run): same class, same line."""
    assert main(["--config", "tiny", *flags, "--dry-run", "--world-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llama-train: error: ") and want in err[0], err


@pytest.mark.timeout(30)
def test_the_dry_run_joins_no_job_reads_no_data_starts_no_heartbeat(monkeypatch, capsys):
    import llama.train as trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("called under --dry-run")
    for name in ("initialize", "build_data"):
        monkeypatch.setattr(trainer, name, forbidden)
    monkeypatch.setattr(trainer.faults, "start", forbidden)
    argv = ["--config", "tiny", "--tp", "2", "--pp", "2", "--dry-run", "--world-size", "8", "--rank", "0", "7"]
    assert main(argv) == 0
    assert sorted(_blocks(capsys.readouterr().out)) == [0, 7]
    assert not torch.distributed.is_initialized()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv, want", [
    (["--world-size", "8"], "--world-size and --rank go with --dry-run"),
    (["--dry-run"], "--dry-run needs --world-size N, the job's number of ranks"),
    (["--dry-run", "--world-size", "8", "--rank", "8"], "--rank 8 is outside the world of 8 ranks (0..7)"),
])
def test_dry_run_flags_are_checked(argv, want, capsys):
    assert main(["--config", "tiny", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"llama-train: error: {want}"


def test_the_trainer_warns_under_slurm_when_tp_groups_span_nodes():
    from llama.setup import slurm_tasks_per_node, tp_node_warning
    from parallel.topology import Topology
    topo = Topology(tp=8, pp=1, dp=4, rank=0)
    assert slurm_tasks_per_node({"SLURM_TASKS_PER_NODE": "4(x8)"}) == 4
    assert slurm_tasks_per_node({"SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "4(x8)"}) == 8
    assert tp_node_warning(topo, {}) is None  # not under SLURM: nothing known about nodes
    assert tp_node_warning(topo, {"SLURM_NTASKS_PER_NODE": "8"}) is None
    line = tp_node_warning(topo, {"SLURM_TASKS_PER_NODE": "4(x8)"})
    assert line.startswith("4 tp groups span nodes at 4 ranks per node (ranks 0-7 on nodes 0-1; ranks 8-15 on "
                           "nodes 2-3; ranks 16-23 on nodes 4-5 and 1 more)"), line
    assert "inter-node network" in line and "tp must divide the tasks per node (4)" in line
