"""Vocab-parallel cross-entropy at tp 1, 2 and 4 against torch's F.cross_entropy on the full
logits: loss and logit gradient, with padded vocabulary columns, ignored targets, several
chunks of tokens, bf16 logits, and the gradient written in place over the logits."""
import pytest
import torch
import torch.nn.functional as F

from parallel import comm
from parallel import loss as loss_module
from parallel.layers import TensorParallel
from parallel.loss import vocab_parallel_cross_entropy
from tests.distributed import run_on_ranks, topology

TOKENS = 24


def _cross_entropy(tp_size, vocab, chunk_entries=None, dtype=torch.float32, inplace=False, local_vocab=None):
    torch.manual_seed(0)
    tp = TensorParallel(topology(tp=tp_size).tp_group) if tp_size > 1 else TensorParallel()
    local_vocab = local_vocab or -(-vocab // tp_size)
    logits = (torch.randn(TOKENS, local_vocab * tp_size) * 3).to(dtype)
    logits[:, vocab:] = 1e4  # padding columns with huge values: they must still never win
    target = torch.randint(0, vocab, (TOKENS,))
    target[::5] = -100
    full = logits[:, :vocab].float().requires_grad_()
    ref = F.cross_entropy(full, target, ignore_index=-100)
    ref.backward()
    saved = dict(loss_module.CHUNK_ENTRIES)
    if chunk_entries:
        loss_module.CHUNK_ENTRIES["cpu"] = chunk_entries
    try:
        local = comm.split(logits, tp.group, -1).requires_grad_()
        leaf = local
        if inplace:  # the logits an op produced (a leaf's storage may not be overwritten)
            local = local * 1
            local.retain_grad()
        loss = vocab_parallel_cross_entropy(local, target, tp.group, tp.rank * local_vocab, vocab,
                                            ignore_index=-100, inplace_backward=inplace)
        loss.backward(retain_graph=inplace)
    finally:
        loss_module.CHUNK_ENTRIES.clear()
        loss_module.CHUNK_ENTRIES.update(saved)
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16: the gradient is rounded to bf16
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, ref.item()), (loss.item(), ref.item())
    grad = comm.all_gather(leaf.grad, tp.group, -1)
    assert grad.dtype == dtype
    diff = (grad[:, :vocab].float() - full.grad).abs().max().item()
    assert diff <= tol, f"logit gradient: max abs difference {diff:.3g} > {tol}"
    assert torch.all(grad[:, vocab:] == 0), "padded vocabulary columns received a gradient"
    if inplace:
        with pytest.raises(RuntimeError, match="can run only once"):
            loss.backward()


@pytest.mark.parametrize("tp_size,vocab", [(2, 256), (4, 250)])
def test_vocab_parallel_cross_entropy_equals_torch(tp_size, vocab):
    run_on_ranks(_cross_entropy, tp_size, tp_size, vocab)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_chunked_bf16_and_in_place(tp_size):
    """Chunks of 2 tokens (the default puts these 24 tokens in one chunk), bf16 logits, and the
    gradient written over the logits give torch's loss and gradient."""
    for dtype in (torch.float32, torch.bfloat16):
        for inplace in (False, True):
            args = (tp_size, 250, 2 * 128, dtype, inplace)
            run_on_ranks(_cross_entropy, tp_size, *args) if tp_size > 1 else _cross_entropy(*args)


def test_a_rank_holding_only_padding():
    """vocab 130 over 4 ranks of 64 columns (padding to 256): the last rank's slice is all padding."""
    run_on_ranks(_cross_entropy, 4, 4, 130, None, torch.float32, False, 64)


def test_vocab_parallel_cross_entropy_is_stable_for_huge_logits():
    # the fourth column is padding: its huge logit must not count
    logits = torch.tensor([[1e4, 0.0, -1e4, 5e4]], requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([1]), vocab_size=3, reduction="sum")
    assert torch.isfinite(loss) and abs(loss.item() - 1e4) < 1e-3
    loss.backward()
    assert torch.allclose(logits.grad, torch.tensor([[1.0, -1.0, 0.0, 0.0]]))


def test_no_tokens():
    logits = torch.zeros(0, 8, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 8)
