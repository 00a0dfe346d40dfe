"""The planner's memory per process against the peak a real run reaches on CPU (goal: within 10%,
as `benchmarks/plan_memory_vs_cpu.py` prints for more layouts), and the tools behind it: the peak
tracker, and cpu-local's measured curves."""
import dataclasses

import pytest
import torch

from llama.config import load_config
from llama.hardware import Hardware, _along, _line
from llama.perf_model import Layout, memory
from parallel.memory import PeakTensorMemory
from tests.distributed import run_on_ranks, topology

pytestmark = pytest.mark.timeout(300)

MiB = 2**20


def test_peak_tracker_counts_new_storages_while_they_live():
    before = torch.zeros(MiB // 4)  # made before: neither it nor its views count
    with PeakTensorMemory() as watch:
        view = before[:10]
        a = torch.zeros(MiB // 4)
        b = a + 1                   # a and b: 2 MiB at once
        del a
        c = b * 2                   # a is gone: b and c, 2 MiB again
        c.add_(1)                   # in place: nothing new
        del b, c
        d = torch.ones(10)
    assert watch.peak == 2 * MiB
    assert watch.current == 40 and view.shape == (10,) and d.shape == (10,)


def test_cpu_local_curves_fit_what_was_measured():
    assert _line([(0, 1.0), (10, 3.0), (20, 5.0)]) == pytest.approx((1.0, 0.2))
    assert _line([(1, 0.0), (2, 0.5), (3, 1.0)]) == (0.0, pytest.approx(4 / 14))  # through 0 when a < 0
    hw = Hardware("cpu-local", collective_curve={"all_reduce": [[0, 1e-3, 5e-4], [1000, 2e-3, 1e-3]]},
                  memory_curve=[[10, 20.0], [1000, 10.0]])
    assert hw.collective_s("all_reduce", 3000, 3) == pytest.approx(3 * 1e-3 + 3000 * 1e-6)
    assert hw.collective_s("all_reduce", 500, 1, overlapped=True) == pytest.approx(5e-4 + 500 * 5e-7)
    assert _along(hw.memory_curve, 100) == pytest.approx(15.0)  # log-linear: halfway on a log scale
    assert hw.memory_s(2e9, 1e6) == pytest.approx(0.2)          # past the last point: its rate


WIDE = dict(dim=256, n_heads=8, vocab_size=512, max_seq_len=256)
LAYOUTS = [  # (model changes, seq_len, global batch, layout)
    ({}, 128, 32, Layout(1, 1, 1, micro_batch=8, recompute="none")),
    ({}, 128, 32, Layout(2, 1, 1, micro_batch=8, sp=True, recompute="none")),
    (WIDE, 256, 16, Layout(1, 1, 1, micro_batch=4, recompute="full")),
    (WIDE, 256, 16, Layout(2, 1, 1, micro_batch=4, sp=True, recompute="selective")),
    (WIDE, 256, 16, Layout(1, 2, 1, vpp=2, micro_batch=2, recompute="none")),
    ({}, 128, 32, Layout(1, 1, 2, micro_batch=4, recompute="none", distributed_optimizer=True)),
]


def _run(model: dict, seq_len: int, batch: int, layout: Layout):
    run = load_config("tiny")
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, **model),
                              data=dataclasses.replace(run.data, sources=[], tokenizer=""))
    run = layout.apply(run)
    run.train.steps, run.train.log_every, run.train.seq_len, run.train.global_batch = 2, 1000, seq_len, batch
    return run


def _peak(model, seq_len, batch, layout):
    from llama.train import ByteDemoData, train
    run = _run(model, seq_len, batch, layout)
    topo = topology(layout.tp, layout.pp, layout.dp)
    data = ByteDemoData(seq_len, 0)
    with PeakTensorMemory() as watch:  # two steps: the second holds the optimizer's state too
        train(run, topo, show_progress=False, data=data)
    return topo.pp_rank, watch.peak


@pytest.mark.parametrize("model,seq_len,batch,layout", LAYOUTS, ids=[str(lay[3]) for lay in LAYOUTS])
def test_predicted_peak_memory_is_within_10_percent_of_the_measured(model, seq_len, batch, layout):
    world = layout.tp * layout.pp * layout.dp
    peaks = run_on_ranks(_peak, world, model, seq_len, batch, layout, timeout=240) if world > 1 \
        else [_peak(model, seq_len, batch, layout)]
    run = _run(model, seq_len, batch, layout)
    for pp_rank in {r for r, _ in peaks}:
        measured = max(p for r, p in peaks if r == pp_rank)
        predicted = memory(run, world, pp_rank, device="cpu")["total"]
        assert predicted / measured == pytest.approx(1.0, abs=0.10), \
            f"pp rank {pp_rank}: predicted {predicted / MiB:.2f} MiB, measured {measured / MiB:.2f} MiB"
