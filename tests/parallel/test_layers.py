"""Each tensor-parallel layer at tp=2 and tp=4 against the same layer on one process.

The reference is the layer built without a group (plain x Wᵀ / embedding lookup / RMSNorm)
with the same logical weights; outputs, input gradients and (gathered) weight gradients must
agree within 1e-5 in fp32.
"""
import pytest
import torch

from parallel import comm
from parallel.layers import ColumnParallelLinear, RowParallelLinear, TensorParallel, VocabParallelEmbedding
from parallel.norm import RMSNorm
from parallel.params import full_tensor, init_parameters
from tests.distributed import run_on_ranks, topology

ATOL = 1e-5
B, S, H = 2, 8, 16


def _close(a, b, what):
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g} > {ATOL}"


def _pair(make, tp_size, sp, seed=7):
    """(reference layer on one process, parallel layer) with the same logical weights.
    sp: False, True, or "keep" (sp keeping the gathered input for backward)."""
    tp = TensorParallel(topology(tp=tp_size).tp_group, sp=bool(sp), keep_gathered=sp == "keep")
    ref, par = make(TensorParallel()), make(tp)
    init_parameters(ref, seed)
    init_parameters(par, seed)
    return tp, ref, par


def _seq_shard(t, tp):
    """The sp shard: this rank's n-th of the tokens in memory order (`parallel.mappings`)."""
    if not tp.sp:
        return t
    rows = t.reshape(-1, *t.shape[2:]).chunk(tp.size)[tp.rank]
    return rows.reshape(t.shape[0], t.shape[1] // tp.size, *t.shape[2:])


def _column(tp_size, sp, gather_output):
    torch.manual_seed(0)  # the same data on every rank
    x = torch.randn(B, S, H, requires_grad=True)
    grad_out = torch.randn(B, S, 24)
    tp, ref, par = _pair(lambda t: ColumnParallelLinear(H, 24, t, gather_output=gather_output), tp_size, sp)
    y_ref = ref(x)
    (y_ref * grad_out).sum().backward()

    x_local = _seq_shard(x.detach(), tp).requires_grad_()
    y = par(x_local)
    expect = y_ref if gather_output else comm.split(y_ref, tp.group, -1)
    _close(y, expect, "output")
    comm.reset_traffic()
    (y * (grad_out if gather_output else comm.split(grad_out, tp.group, -1))).sum().backward()
    # backward all-gathers the input again under sp, unless it was kept
    assert comm.CALLS["all_gather"] == (1 if sp is True else 0)
    _close(x_local.grad, _seq_shard(x.grad, tp), "input gradient")
    _close(full_tensor(par.weight.grad, par.weight, tp.group), ref.weight.grad, "weight gradient")


def _row(tp_size, sp, input_is_parallel):
    torch.manual_seed(0)
    x = torch.randn(B, S, H, requires_grad=True)
    grad_out = torch.randn(B, S, 12)
    tp, ref, par = _pair(lambda t: RowParallelLinear(H, 12, t, input_is_parallel=input_is_parallel), tp_size, sp)
    y_ref = ref(x)
    (y_ref * grad_out).sum().backward()

    x_in = (comm.split(x.detach(), tp.group, -1) if input_is_parallel else x.detach()).requires_grad_()
    y = par(x_in)
    _close(y, _seq_shard(y_ref, tp), "output")
    (y * _seq_shard(grad_out, tp)).sum().backward()
    _close(x_in.grad, comm.split(x.grad, tp.group, -1) if input_is_parallel else x.grad, "input gradient")
    _close(full_tensor(par.weight.grad, par.weight, tp.group), ref.weight.grad, "weight gradient")


def _embedding(tp_size, sp, vocab):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (B, S))
    grad_out = torch.randn(B, S, H)
    tp, ref, par = _pair(lambda t: VocabParallelEmbedding(vocab, H, t), tp_size, sp)
    y_ref = ref(ids)
    (y_ref * grad_out).sum().backward()
    y = par(ids)
    _close(y, _seq_shard(y_ref, tp), "output")
    (y * _seq_shard(grad_out, tp)).sum().backward()
    _close(full_tensor(par.weight.grad, par.weight, tp.group), ref.weight.grad, "weight gradient")
    padded = max(0, par.vocab_start + par.local_rows - max(vocab, par.vocab_start))  # rows past the vocabulary
    assert torch.all(par.weight.grad[par.local_rows - padded:] == 0), "a padded embedding row received a gradient"


def _norm(tp_size, sp):
    torch.manual_seed(0)
    x = torch.randn(B, S, H, requires_grad=True)
    grad_out = torch.randn(B, S, H)
    tp, ref, par = _pair(lambda t: RMSNorm(H, 1e-6, t), tp_size, sp)
    with torch.no_grad():  # a weight that is not all ones, so its gradient path matters
        for layer in (ref, par):
            layer.weight.copy_(torch.linspace(0.5, 1.5, H))
    y_ref = ref(x)
    (y_ref * grad_out).sum().backward()
    x_local = _seq_shard(x.detach(), tp).requires_grad_()
    y = par(x_local)
    _close(y, _seq_shard(y_ref, tp), "output")
    (y * _seq_shard(grad_out, tp)).sum().backward()
    _close(x_local.grad, _seq_shard(x.grad, tp), "input gradient")
    _close(par.weight.grad, ref.weight.grad, "weight gradient (all-reduced across tp under sp)")


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("sp", [False, True, "keep"])
def test_column_parallel_linear(tp_size, sp):
    for gather_output in (False, True):
        run_on_ranks(_column, tp_size, tp_size, sp, gather_output)


def _column_copies(tp_size, replicas, sp):
    """A column layer whose tp/replicas shards are each held by `replicas` consecutive ranks
    (grouped-query attention's kv heads when tp > n_kv_heads). Each copy gets its own output
    gradient, as each rank's query heads give its kv head: the reference weight serves all of
    them, so its gradient is their sum, and so must every copy's be."""
    torch.manual_seed(0)
    x = torch.randn(B, S, H, requires_grad=True)
    grad_outs = torch.randn(tp_size, B, S, 24 * replicas // tp_size)  # one per rank
    tp, ref, par = _pair(lambda t: ColumnParallelLinear(H, 24, t, replicas=min(replicas, t.size)), tp_size, sp)
    y_ref = ref(x).split(24 * replicas // tp_size, dim=-1)
    sum((y_ref[r // replicas] * grad_outs[r]).sum() for r in range(tp_size)).backward()

    x_local = _seq_shard(x.detach(), tp).requires_grad_()
    y = par(x_local)
    _close(y, y_ref[tp.rank // replicas], "output")
    (y * grad_outs[tp.rank]).sum().backward()
    _close(x_local.grad, _seq_shard(x.grad, tp), "input gradient")
    w = par.weight
    assert (w.tp_rank, w.tp_size, w.tp_copies, w.tp_copy_rank) == (tp.rank // replicas, tp_size // replicas,
                                                                  replicas, tp.rank % replicas)
    _close(full_tensor(w.grad, w, tp.group), ref.weight.grad, "weight gradient (summed over the copies)")


@pytest.mark.parametrize("tp_size,replicas", [(2, 2), (4, 2), (4, 4)])
@pytest.mark.parametrize("sp", [False, True])
def test_column_parallel_linear_with_copies_of_each_shard(tp_size, replicas, sp):
    run_on_ranks(_column_copies, tp_size, tp_size, replicas, sp)


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_row_parallel_linear(tp_size, sp):
    run_on_ranks(_row, tp_size, tp_size, sp, True)
    if not sp:
        run_on_ranks(_row, tp_size, tp_size, sp, False)


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_vocab_parallel_embedding(tp_size, sp):
    run_on_ranks(_embedding, tp_size, tp_size, sp, 64)
    run_on_ranks(_embedding, tp_size, tp_size, sp, 50)  # needs padding at tp=4


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_rms_norm(tp_size, sp):
    run_on_ranks(_norm, tp_size, tp_size, sp)


def test_linear_layers_under_autocast_match_torch_linear():
    """fp32 weights, bf16 autocast: the same output and gradients as F.linear under autocast."""
    torch.manual_seed(0)
    for layer in (ColumnParallelLinear(H, 2 * H), RowParallelLinear(2 * H, H)):
        torch.nn.init.normal_(layer.weight, std=0.2)
        ref_weight = layer.weight.detach().clone().requires_grad_()
        x = torch.randn(B, S, layer.weight.shape[1], requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = layer(x), torch.nn.functional.linear(x_ref, ref_weight)
        assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
        y.float().sum().backward()
        y_ref.float().sum().backward()
        assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
        assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.weight.grad, ref_weight.grad)
