"""Checkpoint pieces: every rank writes its share once, and any layout reads back the logical
tensors (weights and Adam state) of a one-process run of the same step, against that run."""
import dataclasses
import json

import pytest
import torch

from llama.config import load_config
from parallel.checkpoint_pieces import INDEX, PieceIndex, gather_index, my_pieces, named_params, write_pieces
from parallel.params import make_param, shard_of
from parallel.topology import build_topology
from tests.distributed import run_on_ranks, topology

pytestmark = pytest.mark.timeout(240)
# Adam's first update, g/(|g| + eps), turns the rounding of a gradient near eps into ~1e-6
ATOL = 2e-6


def _run(tp, pp, dp, zero, model=None):
    """`model`: overrides of the tiny model's config."""
    run = load_config("tiny", {"model": model or {}})
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, sources=[], tokenizer=""))
    t = run.train
    t.tp, t.pp, t.dp, t.distributed_optimizer, t.steps, t.micro_batch = tp, pp, dp, zero, 1, 8
    return run


def _train(run, topo):
    from llama.train import ByteDemoData, train
    return train(run, topo, show_progress=False, data=ByteDemoData(run.train.seq_len, 0))


def _save(directory, tp, pp, dp, zero, model=None):
    topo = topology(tp, pp, dp)
    result = _train(_run(tp, pp, dp, zero, model), topo)
    pieces = my_pieces(result.chunks, topo, result.optimizer)
    nbytes = write_pieces(directory, topo.rank, pieces)
    index = gather_index([pc for pc, _ in pieces], topo)
    if topo.rank == 0:
        (directory / INDEX).write_text(json.dumps(index))
    return nbytes


def _reference(model=None):
    """The logical weights and Adam state after the same step on one process."""
    result = _train(_run(1, 1, 1, False, model), build_topology(1, 1, 1))
    opt, tensors, params = result.optimizer, {}, dict(named_params(result.chunks))
    for name, p in params.items():
        tensors[name] = p.detach().clone()
    for i, bucket in enumerate(opt.buckets.buckets):
        state = opt.bucket_state(i)
        for p, off in zip(bucket.params, bucket.offsets):
            name = next(n for n, q in params.items() if q is p)
            for k, flat in state.items():
                tensors[f"{name}.{k}"] = flat[off:off + p.numel()].view(p.shape).clone()
    return tensors, params


KV1, TIED = {"n_kv_heads": 1}, {"tie_word_embeddings": True}


# KV1: grouped-query attention with tp 2 holding two copies of the one kv head, which are written once;
# TIED: the last stage's copy of a tied embedding is not written (the first stage writes it)
@pytest.mark.parametrize("tp,pp,dp,zero,model", [(2, 1, 2, True, None), (1, 2, 2, False, None),
                                                 (2, 1, 2, True, KV1), (2, 1, 2, False, KV1), (1, 2, 2, True, TIED)])
def test_every_rank_writes_its_share_once_and_any_layout_reads_it_back(tmp_path, tp, pp, dp, zero, model):
    written = run_on_ranks(_save, tp * pp * dp, tmp_path, tp, pp, dp, zero, model, timeout=200)
    reference, params = _reference(model)
    index = PieceIndex.open(tmp_path)
    assert set(index.tensors) == set(reference)
    total = 0
    for name, expected in reference.items():
        got = index.logical(name)
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=ATOL, msg=name)
        entry = index.tensors[name]  # each element of each tp shard is in exactly one piece
        for r in range(entry["tp_size"]):
            spans = sorted((a, b) for rr, a, b, _, _ in entry["pieces"] if rr == r)
            assert spans[0][0] == 0 and all(b == a2 for (_, b), (a2, _) in zip(spans, spans[1:])), name
            total += spans[-1][1] * got.element_size()
    assert sum(written) == total  # nothing written twice
    if pp == 1:  # stages of different sizes aside, the busiest rank writes about 1/world
        assert max(written) <= 1.25 * total / len(written), written
        # and what the planner predicts a GPU writes for this layout is what the busiest one wrote
        from llama.hardware import load
        from llama.perf_model import Layout, checkpoint_save, predict
        run, layout = _run(tp, pp, dp, zero, model), Layout(tp, pp, dp, micro_batch=8, distributed_optimizer=zero)
        save = checkpoint_save(predict(run, layout, load("a100-80gb"), 0), run, load("a100-80gb"), 1.0)
        assert save["bytes_per_gpu"] == pytest.approx(max(written), rel=0.02)

    for name, p in params.items():  # tp 4 shards of every weight and state, read from the pieces
        for suffix in ("", ".exp_avg"):
            logical = reference[name + suffix]
            d = p.tp_dim
            if d is None:
                continue
            for r in range(4):
                local = list(logical.shape)
                local[d] = -(-local[d] // 4)
                shard = make_param(local, logical.shape, d, r, 4, None, device="meta")
                torch.testing.assert_close(index.local(name + suffix, shard).float(),
                                           shard_of(logical, shard).float(), rtol=1e-5, atol=ATOL)
