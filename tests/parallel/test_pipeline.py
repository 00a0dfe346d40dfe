"""Pipeline parallelism against the whole model on one process.

pp ∈ {2, 4} with GPipe, 1F1B and interleaved 1F1B (vpp=2), and pp=2 × tp=2 with sp: the loss
of every micro-batch and every parameter gradient equal the pp=1 run within 1e-5 relative in
fp32, and after several SGD steps the weights still match. Every rank's order of forwards and
backwards follows the published warm-up formulas (Megatron-LM), and the activations a rank keeps
at once (peak_in_flight) are the warm-up's plus one. Two stages that disagree on any field of
the handshake header both raise an error that names both values.
"""
import pytest
import torch

from llama.config import LlamaConfig
from llama.memory_estimate import micro_batches_in_flight
from llama.model import Transformer
from llama.parallelize import activation_shape, build_chunks
from parallel.params import full_tensor, init_parameters
from parallel.pipeline.p2p import PipelineMismatchError, PipelineP2P
from parallel.pipeline.partition import PartitionError, chunk_sizes, chunks_of_rank
from parallel.pipeline.schedules import SCHEDULES, ScheduleError, run_schedule, schedule_order
from tests.distributed import run_on_ranks, run_processes, topology

CFG = LlamaConfig(dim=32, n_layers=8, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)
MB, SEQ, RTOL = 2, 8, 1e-5


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _batches(step, m):
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, CFG.vocab_size, (m, MB, SEQ + 1), generator=gen)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def warmup(schedule, m, pp, rank, vpp=1):
    """Forward passes rank `rank` runs before its first backward, by the published schedules
    (Megatron-LM's get_forward_backward_func): 1F1B pp − rank − 1, capped at m; interleaved
    (pp − rank − 1)·2 + (vpp − 1)·pp, capped at m·vpp, and all m·vpp when m == pp."""
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(pp - rank - 1, m)
    if m == pp:
        return m * vpp
    return min((pp - rank - 1) * 2 + (vpp - 1) * pp, m * vpp)


def expected_order(schedule, m, pp, rank, vpp=1):
    """The published order, written out: `warmup` forwards, then one forward and one backward
    until the forwards run out, then the remaining backwards. The k-th forward of a rank runs
    model chunk (k mod pp·vpp) // pp on micro-batch (k // pp·vpp)·pp + k mod pp; the k-th
    backward the same micro-batch on chunk vpp − 1 − that (Megatron-LM's get_model_chunk_id)."""
    total, w = m * vpp, warmup(schedule, m, pp, rank, vpp)

    def virtual(kind, k):
        chunk = k % (pp * vpp) // pp
        return kind, k // (pp * vpp) * pp + k % pp, vpp - 1 - chunk if kind == "B" else chunk

    order = [virtual("F", k) for k in range(w)]
    for k in range(total - w):
        order += [virtual("F", w + k), virtual("B", k)]
    return order + [virtual("B", k) for k in range(max(0, total - w), total)]


def expected_peak(schedule, m, pp, rank, vpp=1):
    """Micro-batches (× chunks) whose activations are kept at once: the warm-up and one more."""
    return min(warmup(schedule, m, pp, rank, vpp) + 1, m * vpp)


def _pipeline_matches_one_process(pp, tp, sp, schedule, vpp, m, steps=3):
    topo = topology(tp=tp, pp=pp)
    chunks = build_chunks(CFG, topo, sp=sp, vpp=vpp, seed=5, attention="sdpa")
    ref = Transformer(CFG, attention="sdpa")
    init_parameters(ref, 5)
    ref_params = dict(ref.named_parameters())
    mine = [(n, p) for c in chunks for n, p in c.named_parameters()]
    # SGD: linear in the gradient, so fp32 rounding differences stay at rounding size over steps
    opt = torch.optim.SGD([p for _, p in mine], lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    p2p = PipelineP2P(topo, ring=vpp > 1)
    peaks = []
    for step in range(steps):
        micro = _batches(step, m)
        stats = run_schedule(schedule, chunks, micro, p2p, pp, topo.pp_rank,
                             activation_shape(CFG, MB, SEQ, tp, sp), torch.float32)
        peaks.append(stats.peak_in_flight)
        ref_losses = []
        for tokens, targets in micro:
            loss = ref(tokens, targets)
            (loss / m).backward()
            ref_losses.append(loss.item())
        if topo.is_last_stage:
            assert len(stats.losses) == m
            for got, want in zip(stats.losses, ref_losses):
                assert abs(got - want) <= RTOL * abs(want), (step, got, want)
        for name, p in mine:
            err = _rel_err(full_tensor(p.grad, p, topo.tp_group), ref_params[name].grad)
            assert err <= RTOL, f"step {step}: gradient of {name} differs by {err:.3g}"
        opt.step(), ref_opt.step(), opt.zero_grad(), ref.zero_grad()
    for name, p in mine:
        err = _rel_err(full_tensor(p.detach(), p, topo.tp_group), ref_params[name].detach())
        assert err <= RTOL, f"after {steps} steps: {name} differs by {err:.3g}"
    return topo.pp_rank, peaks[-1]


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_matches_one_process(pp, schedule):
    vpp, m = (2, 4) if schedule == "interleaved" else (1, 6)
    peaks = dict(run_on_ranks(_pipeline_matches_one_process, pp, pp, 1, False, schedule, vpp, m))
    # GPipe keeps every micro-batch; 1F1B at most pp on stage 0, fewer further down
    assert peaks == {r: expected_peak(schedule, m, pp, r, vpp) for r in range(pp)}
    if schedule == "1f1b":
        assert peaks[0] == pp and all(peaks[r] == pp - r for r in range(pp))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_with_tensor_and_sequence_parallelism(schedule):
    vpp = 2 if schedule == "interleaved" else 1
    peaks = dict(run_on_ranks(_pipeline_matches_one_process, 4, 2, 2, True, schedule, vpp, 4))
    assert peaks == {r: expected_peak(schedule, 4, 2, r, vpp) for r in range(2)}


def test_every_action_once_and_backward_after_forward():
    for schedule, vpp in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)):
        for pp, m in ((2, 4), (4, 8), (4, 4), (3, 6)):
            for rank in range(pp):
                order = schedule_order(schedule, m, pp, rank, vpp)
                expected = {(k, i, c) for k in "FB" for i in range(m) for c in range(vpp)}
                assert sorted(order) == sorted(expected) and len(order) == len(expected)
                assert all(order.index(("F", i, c)) < order.index(("B", i, c)) for _, i, c in order)


ORDER_CASES = [("gpipe", pp, 1, m) for pp, m in ((2, 4), (4, 3))]
ORDER_CASES += [("1f1b", pp, 1, m) for pp in (2, 3, 4, 8) for m in (1, 2, pp - 1, pp, pp + 1, 3 * pp)]
ORDER_CASES += [("interleaved", pp, vpp, m) for pp in (2, 3, 4) for vpp in (2, 3, 5) for m in (pp, 2 * pp, 3 * pp)]


def test_schedule_orders_follow_the_published_warm_up():
    """Every rank's order, warm-up included, against the formula; and the activations each rank
    keeps at once (StageStats.peak_in_flight, measured by the executor) against the warm-up."""
    for schedule, pp, vpp, m in ORDER_CASES:
        for rank in range(pp):
            order = schedule_order(schedule, m, pp, rank, vpp)
            want = [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)] if schedule == "gpipe" \
                else expected_order(schedule, m, pp, rank, vpp)
            case = f"{schedule} pp={pp} vpp={vpp} m={m} rank {rank}"
            w = warmup(schedule, m, pp, rank, vpp)
            forwards_first = next(i for i, (kind, _, _) in enumerate(order) if kind == "B")
            assert forwards_first == expected_peak(schedule, m, pp, rank, vpp), \
                f"{case}: {forwards_first} forwards before the first backward, but the warm-up is {w}"
            assert order == want, case
            peak = _tiny_run(schedule, pp, vpp, m, rank).peak_in_flight
            assert peak == expected_peak(schedule, m, pp, rank, vpp), f"{case}: peak_in_flight {peak}"
            # what the start-up summary's activation memory multiplies by
            assert micro_batches_in_flight(schedule, m, pp, rank, vpp) == peak, case


def test_partition_and_clear_errors():
    assert [c.layer_ids for c in chunks_of_rank(8, 2, 1, vpp=2)] == [(2, 3), (6, 7)]
    assert [(c.first, c.last) for c in chunks_of_rank(8, 2, 0, vpp=2)] == [(True, False), (False, False)]
    assert chunk_sizes(10, 3, stage_layers=[4, 4, 2]) == [4, 4, 2]
    with pytest.raises(PartitionError, match=r"n_layers=10 is not divisible by pp\*vpp=4\*1=4"):
        chunk_sizes(10, 4)
    with pytest.raises(PartitionError, match="must have pp\\*vpp=3 positive entries summing to n_layers=10"):
        chunk_sizes(10, 3, stage_layers=[4, 4, 4])
    with pytest.raises(ScheduleError, match=r"needs the number of micro-batches \(m=6\) to be a multiple of pp=4"):
        schedule_order("interleaved", 6, 4, 0, 2)
    with pytest.raises(ScheduleError, match="need schedule='interleaved'"):
        schedule_order("1f1b", 4, 2, 0, 2)


def _mismatched_stage(seq_on_rank_1):
    topo = topology(pp=2)
    chunks = build_chunks(CFG, topo, seed=5, attention="sdpa")
    seq = seq_on_rank_1 if topo.pp_rank == 1 else SEQ
    run_schedule("1f1b", chunks, _batches(0, 2), PipelineP2P(topo), 2,
                 topo.pp_rank, activation_shape(CFG, MB, seq, 1, False), torch.float32)


def _stage_dies(dying_rank):
    import os
    topo = topology(pp=4)
    chunks = build_chunks(CFG, topo, seed=5, attention="sdpa")
    if topo.pp_rank == dying_rank:
        chunks[0].register_forward_hook(lambda *_: os._exit(3))  # dies in its first forward
    run_schedule("1f1b", chunks, _batches(0, 4), PipelineP2P(topo), 4,
                 topo.pp_rank, activation_shape(CFG, MB, SEQ, 1, False), torch.float32)


def test_a_shape_mismatch_is_an_error_on_every_rank():
    out = run_processes(_mismatched_stage, 2, 2 * SEQ)
    for rank in (0, 1):
        assert out[rank].startswith("PipelineMismatchError: pipeline stages disagree: stage 0 has activations "
                                    "[2, 8, 32] torch.float32"), out
        assert "stage 1 has activations [2, 16, 32]" in out[rank]


HEADER = dict(b=2, s=8, h=32, dtype=torch.float32, m=4, vpp=1, schedule=1)  # stage 0's header
OTHER = dict(b=3, s=16, h=48, dtype=torch.bfloat16, m=6, vpp=2, schedule=2)   # one of these on stage 1


def _names(field, header) -> str:
    """How a mismatch error names `field`'s value in a stage's header."""
    if field in "bsh":
        return f"[{header['b']}, {header['s']}, {header['h']}]"
    return {"dtype": str(header["dtype"]), "m": f"{header['m']} micro-batches", "vpp": f"vpp={header['vpp']}",
            "schedule": f"schedule #{header['schedule']}"}[field]


def _handshake_with_one_field_changed(field):
    topo = topology(pp=2)
    mine = HEADER | ({field: OTHER[field]} if topo.pp_rank == 1 else {})
    try:
        PipelineP2P(topo).handshake((mine["b"], mine["s"], mine["h"]), mine["dtype"], mine["m"], mine["vpp"],
                                    mine["schedule"])
    except PipelineMismatchError as err:
        return str(err)
    return None


@pytest.mark.parametrize("field", list(HEADER))
def test_every_handshake_field_is_checked(field):
    """Two stages that differ in one field of the header (activation b, s, h, dtype, micro-batches,
    vpp, schedule) both raise, and the error gives each stage's value of that field."""
    errors = run_on_ranks(_handshake_with_one_field_changed, 2, field)
    assert errors != [None, None], f"stages whose {field} differ ({HEADER[field]} and {OTHER[field]}) did not raise"
    assert errors[0] is not None and errors[0] == errors[1], f"{field}: not the same error on both stages: {errors}"
    stage0, stage1 = errors[0].split("; ")
    assert "stage 0 has" in stage0 and _names(field, HEADER) in stage0, errors[0]
    assert "stage 1 has" in stage1 and _names(field, HEADER | {field: OTHER[field]}) in stage1, errors[0]


def test_a_stage_that_dies_is_an_error_on_every_rank():
    out = run_processes(_stage_dies, 4, 2, collective_timeout=15, timeout=40)
    assert out[2] == "exit code 3"
    for rank in (0, 1, 3):
        assert out[rank] != "ok" and out[rank].split(":")[0] in ("RuntimeError", "DistBackendError"), out


class _RecordingP2P:
    """The executor's transfers, recorded as NCCL would see them: a rank's sequence of groups."""

    def __init__(self, pp, pp_rank):
        self.pp, self.pp_rank, self.groups, self.wait_s = pp, pp_rank, [], 0.0

    def handshake(self, *args, **kwargs):
        pass

    def exchange(self, sends, recvs):
        group = [("send", rank, tag) for _, rank, tag in sends] + [("recv", rank, tag) for rank, tag in recvs]
        self.groups.append(group)
        return [lambda: torch.zeros(1, 3) for _ in recvs]

    def flush(self):
        pass


class _TinyChunk(torch.nn.Module):
    def __init__(self, first, last):
        super().__init__()
        self.first_stage, self.last_stage, self.w = first, last, torch.nn.Parameter(torch.ones(1))

    def forward(self, x, targets=None):
        h = (x.float() if self.first_stage else x) * self.w
        return h.sum() if self.last_stage else h


def _nccl_deadlocks(groups_by_rank) -> bool:
    """Strict rendezvous: every send waits for its receive; per (src, dst) sends and receives match
    in order (NCCL ignores tags); a rank runs its groups one after another. True if stuck."""
    pos = {r: 0 for r in groups_by_rank}
    matched = {r: set() for r in groups_by_rank}

    def head(r):
        return groups_by_rank[r][pos[r]] if pos[r] < len(groups_by_rank[r]) else None

    progress = True
    while progress:
        progress = False
        for r in groups_by_rank:
            group = head(r)
            if group is None:
                continue
            for i, (kind, peer, tag) in enumerate(group):
                if kind != "send" or i in matched[r] or head(peer) is None:
                    continue
                # the first unmatched send r→peer must meet the first unmatched recv peer←r
                if any(k == "send" and p == peer and j not in matched[r] for j, (k, p, _) in enumerate(group[:i])):
                    continue
                for j, (k2, p2, tag2) in enumerate(head(peer)):
                    if k2 == "recv" and p2 == r and j not in matched[peer]:
                        assert tag2 == tag, f"NCCL would pair send {tag} with receive {tag2}: out of order"
                        matched[r].add(i)
                        matched[peer].add(j)
                        progress = True
                        break
        for r in groups_by_rank:
            group = head(r)
            if group is not None and len(matched[r]) == len(group):
                pos[r] += 1
                matched[r] = set()
                progress = True
    return any(head(r) is not None for r in groups_by_rank)


def _tiny_run(schedule, pp, vpp, m, rank, p2p=None):
    """Rank `rank`'s part of a schedule on one process, its transfers recorded, not made."""
    chunks = [_TinyChunk(c * pp + rank == 0, c * pp + rank == pp * vpp - 1) for c in range(vpp)]
    micro = [(torch.ones(1, 3), None) for _ in range(m)]
    return run_schedule(schedule, chunks, micro, p2p or _RecordingP2P(pp, rank), pp, rank, (1, 3), torch.float32)


def _groups(schedule, pp, vpp, m):
    groups = {}
    for rank in range(pp):
        p2p = _RecordingP2P(pp, rank)
        _tiny_run(schedule, pp, vpp, m, rank, p2p)
        groups[rank] = p2p.groups
    return groups


@pytest.mark.parametrize("schedule,pp,vpp,m", [("gpipe", 2, 1, 4), ("gpipe", 4, 1, 6), ("1f1b", 2, 1, 2),
                                               ("1f1b", 4, 1, 8), ("1f1b", 4, 1, 3), ("1f1b", 8, 1, 32),
                                               ("interleaved", 2, 2, 4), ("interleaved", 4, 2, 8),
                                               ("interleaved", 4, 5, 32), ("interleaved", 4, 2, 4)])
def test_schedules_cannot_deadlock_even_when_sends_wait_for_receives(schedule, pp, vpp, m):
    """NCCL's semantics, modelled strictly (the 65B template's interleaved 4 x 5 x 32 included);
    on gloo every schedule is also run for real above."""
    assert not _nccl_deadlocks(_groups(schedule, pp, vpp, m))
