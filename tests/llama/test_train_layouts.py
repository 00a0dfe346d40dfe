"""The project's core claim: every layout trains the same model.

20 steps of a tiny LLaMA in fp32 with a fixed seed and data at every (tp, pp, dp) up to 8
processes, with and without sp and the distributed optimizer, against (1, 1, 1): at every step
the loss within 1e-4 relative and the global gradient norm within 1e-5 (layouts differ by at
most 2e-6 here; a tp-replicated norm gain counted twice moves it by about 1e-4), the reduced gradients
(gathered to the logical tensors) of the first and the last step within 1e-4, and the final
weights within 1e-4.

The gradient clip (CLIP) sits inside the range of the run's gradient norms, so that clipping
acts at some steps and not at others: a gradient off by a uniform factor (summed over dp instead
of averaged, a norm counting a tensor twice) then changes the weights. AdamW alone ignores a
constant factor, and so does clipping that acts at every step (the gradient becomes g/|g|).
"""
import contextlib
import functools

import pytest
import torch
import torch.distributed as dist

from llama.config import load_config
from llama.demo_corpus import prose_text
from llama.train import ByteDemoData, train
from parallel.checkpoint_pieces import named_params
from parallel.data_parallel import GradBuckets
from parallel.params import full_tensor
from parallel.topology import build_topology
from tests.distributed import run_on_ranks, topology

STEPS, RTOL, NORM_RTOL, CLIP = 20, 1e-4, 1e-5, 1.3


@functools.cache
def _text():
    return prose_text(max_bytes=40_000)


def _run_config(tp=1, pp=1, sp=False, distributed_optimizer=False, micro_batch=2, global_batch=8, model=None,
                **train):
    model = dict(dim=32, n_layers=4, n_heads=4, vocab_size=256, multiple_of=16, max_seq_len=16) | (model or {})
    train = dict(steps=STEPS, seq_len=16, global_batch=global_batch, micro_batch=micro_batch, lr=1e-3,
                 warmup_steps=5, dtype="fp32", attention="sdpa", recompute="none", tp=tp, pp=pp, sp=sp,
                 distributed_optimizer=distributed_optimizer) | train
    return load_config("tiny", {"model": model, "train": train, "data": {"tokenizer": "", "sources": []}})


@contextlib.contextmanager
def reduced_gradients():
    """Record what every optimiser step receives: per step, (buckets, copies of the reduced
    bucket gradients), taken before clipping scales them in place."""
    steps, finish = [], GradBuckets.finish

    def recording_finish(self):
        grads = finish(self)
        steps.append((self, [g.detach().clone() for g in grads]))
        return grads

    GradBuckets.finish = recording_finish
    try:
        yield steps
    finally:
        GradBuckets.finish = finish


def logical_gradients(chunks, topo, buckets, grads) -> dict:
    """Per parameter name, the logical (full, unpadded) gradient from this rank's reduced bucket
    gradients: the whole bucket, or under the distributed optimizer the dp shard, gathered here
    with plain torch.distributed."""
    full = []
    for b, g in zip(buckets.buckets, grads):
        if g.numel() != b.numel:  # this rank's 1/dp of the bucket
            parts = [torch.empty_like(g) for _ in range(topo.dp)]
            dist.all_gather(parts, g.contiguous(), group=topo.dp_group)
            g = torch.cat(parts)
        full.append(g)
    where = {id(p): (i, off) for i, b in enumerate(buckets.buckets) for p, off in zip(b.params, b.offsets)}
    out = {}
    for name, p in named_params(chunks):  # a tied head's copy under the embedding's name
        i, off = where[id(p)]
        out[name] = full_tensor(full[i][off:off + p.numel()].view_as(p), p, topo.tp_group).clone()
    return out


def _run(topo, ckpt=None, record_gradients=False, **kw) -> dict:
    run = _run_config(tp=topo.tp, pp=topo.pp, **kw)
    with reduced_gradients() if record_gradients else contextlib.nullcontext() as steps:
        result = train(run, topo, show_progress=False, data=ByteDemoData(16, run.train.seed, _text()), ckpt=ckpt)
    grads = [logical_gradients(result.chunks, topo, *steps[i]) for i in (0, -1)] if record_gradients else []
    weights = {}
    if topo.dp_rank == 0:
        for name, p in named_params(result.chunks):
            weights[name] = full_tensor(p.detach(), p, topo.tp_group).clone()
    return dict(losses=result.losses, grad_norms=result.grad_norms, weights=weights, skipped=result.skipped,
                grads=grads if topo.dp_rank == 0 else [{} for _ in grads], state_bytes=result.optimizer.state_bytes())


def _train(topo, ckpt=None, **kw):
    """(losses, logical weights on dp rank 0, skipped steps, optimiser state bytes) of a run."""
    out = _run(topo, ckpt, **kw)
    return out["losses"], out["weights"], out["skipped"], out["state_bytes"]


def _layout_run(topo, **kw) -> dict:
    """A run of the layout tests: the clip inside the range of the gradient norms, the gradients
    of the first and the last step recorded."""
    return _run(topo, record_gradients=True, **{"grad_clip": CLIP} | kw)


def _train_on_ranks(tp, pp, **kw):
    return _layout_run(topology(tp=tp, pp=pp), **kw)


@functools.cache
def _reference(model: tuple = ()):
    """The one-process run, of the default model or with `model`'s (key, value) overrides."""
    return _layout_run(build_topology(), **({"model": dict(model)} if model else {}))


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def _assert_same_run(outs, what, model: dict | None = None):
    ref = _reference(tuple(sorted((model or {}).items())))
    assert min(ref["grad_norms"]) < CLIP < max(ref["grad_norms"]), \
        f"the clip {CLIP} must act at some steps and not at others: gradient norms {ref['grad_norms']}"
    weights, grads = {}, [{}, {}]
    for out in outs:
        assert not out["skipped"]
        assert len(out["losses"]) == len(out["grad_norms"]) == STEPS
        for step in range(STEPS):
            for key, label, tol in (("grad_norms", "gradient norm", NORM_RTOL), ("losses", "loss", RTOL)):
                got, want = out[key][step], ref[key][step]
                assert abs(got - want) <= tol * abs(want), f"{what}: step {step} {label} {got} vs {want}"
        weights.update(out["weights"])
        for mine, g in zip(grads, out["grads"]):
            mine.update(g)
    for step, got, want in ((0, grads[0], ref["grads"][0]), (STEPS - 1, grads[1], ref["grads"][1])):
        assert got.keys() == want.keys()
        for name, g in got.items():
            err = rel_err(g, want[name])
            assert err <= RTOL, f"{what}: step {step} gradient of {name} differs by {err:.3g}"
    assert weights.keys() == ref["weights"].keys()
    for name, w in weights.items():
        err = rel_err(w, ref["weights"][name])
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


@pytest.mark.parametrize("sp", [False, True])
def test_grouped_query_attention_with_copied_kv_heads_trains_the_same_model(sp):
    """One kv head for 4 query heads at tp 2: both tp ranks hold a copy of it, and their
    gradients must sum to the one process's (under dp, pp and ZeRO-1 too)."""
    outs = run_on_ranks(_train_on_ranks, 8, 2, 2, sp=sp, distributed_optimizer=sp, model={"n_kv_heads": 1},
                        timeout=300)
    _assert_same_run(outs, f"(tp, pp, dp)=(2, 2, 2) sp={sp} with n_kv_heads=1", {"n_kv_heads": 1})


@pytest.mark.parametrize("tp,pp,dp,sp", [(2, 2, 2, True), (1, 2, 2, False), (2, 1, 2, False)])
def test_tied_embeddings_train_the_same_model(tp, pp, dp, sp):
    """LLaMA 3.2's tied head: at pp 1 one weight serves both ends; at pp 2 the last stage's copy
    gets the sum of both gradients, and both copies stay equal to the one process's weight."""
    outs = run_on_ranks(_train_on_ranks, tp * pp * dp, tp, pp, sp=sp, distributed_optimizer=sp,
                        model={"tie_word_embeddings": True}, timeout=300)
    _assert_same_run(outs, f"(tp, pp, dp)=({tp}, {pp}, {dp}) sp={sp} with tied embeddings",
                     {"tie_word_embeddings": True})
    copies = [out["weights"]["tok_embeddings.weight"] for out in outs if "tok_embeddings.weight" in out["weights"]]
    assert len(copies) == (2 if pp > 1 else 1) * tp  # both ends, each tp rank gathering the whole tensor
    assert all(torch.equal(c, copies[0]) for c in copies)
