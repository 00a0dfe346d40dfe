"""The project's core claim: every layout trains the same model.

20 steps of a tiny LLaMA in fp32 with a fixed seed and data at every (tp, pp, dp) up to 8
processes, with and without sp and the distributed optimizer: the loss at every step within 1e-4
relative of (1, 1, 1), and the final weights within 1e-4.
"""
import functools

import pytest

from llama.config import load_config
from llama.demo_corpus import prose_text
from llama.train import ByteDemoData, train
from parallel.params import full_tensor
from parallel.topology import build_topology
from tests.distributed import run_on_ranks, topology

STEPS, RTOL = 20, 1e-4


@functools.cache
def _text():
    return prose_text(max_bytes=40_000)


def _run_config(tp=1, pp=1, sp=False, distributed_optimizer=False, micro_batch=2, global_batch=8, **train):
    model = dict(dim=32, n_layers=4, n_heads=4, vocab_size=256, multiple_of=16, max_seq_len=16)
    train = dict(steps=STEPS, seq_len=16, global_batch=global_batch, micro_batch=micro_batch, lr=1e-3,
                 warmup_steps=5, dtype="fp32", attention="sdpa", recompute="none", tp=tp, pp=pp, sp=sp,
                 distributed_optimizer=distributed_optimizer) | train
    return load_config("tiny", {"model": model, "train": train, "data": {"tokenizer": "", "sources": []}})


def _train(topo, ckpt=None, **kw):
    run = _run_config(tp=topo.tp, pp=topo.pp, **kw)
    result = train(run, topo, show_progress=False, data=ByteDemoData(16, run.train.seed, _text()), ckpt=ckpt)
    weights = {}
    if topo.dp_rank == 0:
        for chunk in result.chunks:
            for name, p in chunk.named_parameters():
                weights[name] = full_tensor(p.detach(), p, topo.tp_group).clone()
    return result.losses, weights, result.skipped, result.optimizer.state_bytes()


def _train_on_ranks(tp, pp, **kw):
    return _train(topology(tp=tp, pp=pp), **kw)


@functools.cache
def _reference():
    return _train(build_topology())


def _assert_same_run(outs, what):
    ref_losses, ref_weights, _, _ = _reference()
    weights = {}
    for losses, w, skipped, _ in outs:
        assert not skipped
        for step, (got, want) in enumerate(zip(losses, ref_losses)):
            assert abs(got - want) <= RTOL * abs(want), f"{what}: step {step} loss {got} vs {want}"
        weights.update(w)
    assert weights.keys() == ref_weights.keys()
    for name, w in weights.items():
        err = ((w - ref_weights[name]).abs().max() / ref_weights[name].abs().max()).item()
        assert err <= RTOL, f"{what}: final {name} differs by {err:.3g}"


LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)]


CASES = [(*layout, sp, sp) for layout in LAYOUTS for sp in (False, True)]  # sp and ZeRO-1 off, then both on
CASES += [(2, 2, 2, True, False), (1, 1, 2, False, True), (2, 1, 2, False, True)]  # and one without the other


def test_an_uneven_pipeline_split_trains_the_same_model():
    outs = run_on_ranks(_train_on_ranks, 2, 1, 2, stage_layers=[3, 1], timeout=300)
    _assert_same_run(outs, "pp=2 with stage_layers=[3, 1]")


def test_sp_keeping_the_gathered_input_trains_the_same_model():
    outs = run_on_ranks(_train_on_ranks, 4, 2, 2, sp=True, sp_keep_gathered=True, timeout=300)
    _assert_same_run(outs, "tp=2 pp=2 with sp_keep_gathered")


@pytest.mark.parametrize("tp,pp,dp,sp,distributed_optimizer", CASES)
def test_every_layout_trains_the_same_model(tp, pp, dp, sp, distributed_optimizer):
    outs = run_on_ranks(_train_on_ranks, tp * pp * dp, tp, pp, sp=sp, distributed_optimizer=distributed_optimizer,
                        timeout=300)
    _assert_same_run(outs, f"(tp, pp, dp)=({tp}, {pp}, {dp}) sp={sp} distributed_optimizer={distributed_optimizer}")
