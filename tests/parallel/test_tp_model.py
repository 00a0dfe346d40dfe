"""The whole LLaMA at tp ∈ {2, 4} × sp off/on against tp=1 on one process.

The reference is the same config and seed built without a process group. Logits (gathered),
loss and every parameter gradient (gathered to the logical tensor) must agree within 1e-5
relative in fp32; overlap on and off must give the same gradients.
"""
import pytest
import torch

from llama.config import LlamaConfig
from llama.model import Transformer, check_tensor_parallel
from parallel.layers import TensorParallel
from parallel.params import full_tensor, init_parameters
from tests.distributed import run_on_ranks, topology

# vocab 250 needs padding at tp=4; multiple_of 16 keeps the FFN (176) divisible by 4
CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=250, multiple_of=16, max_seq_len=32)
RTOL = 1e-5


def _rel_close(a, b, what):
    err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
    assert err <= RTOL, f"{what}: relative difference {err:.3g} > {RTOL}"


def _run(model, tokens, targets):
    logits = model.gather_logits(model(tokens))
    loss = model(tokens, targets)
    loss.backward()
    return logits, loss


def _model_equals_one_process(tp_size, sp, recompute="none", cfg=CFG):
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = torch.roll(tokens, -1, dims=1)
    ref = Transformer(cfg, attention="sdpa")
    init_parameters(ref, seed=3)
    ref_logits, ref_loss = _run(ref, tokens, targets)

    results = {}
    # (overlap, keep_gathered): overlapping the collectives and keeping the gathered input under
    # sp change when the work is done, not the numbers
    variants = [(True, False), (False, False)] + ([(True, True)] if sp else [])
    for overlap, keep in variants:
        tp = TensorParallel(topology(tp=tp_size).tp_group, sp=sp, overlap=overlap, keep_gathered=keep)
        model = Transformer(cfg, tp=tp, attention="sdpa", recompute=recompute)
        init_parameters(model, seed=3)
        logits, loss = _run(model, tokens, targets)
        _rel_close(logits, ref_logits, "logits")
        _rel_close(loss, ref_loss, "loss")
        ref_params = dict(ref.named_parameters())
        grads = {}
        for name, p in model.named_parameters():
            grads[name] = full_tensor(p.grad, p, tp.group)
            _rel_close(grads[name], ref_params[name].grad, f"gradient of {name}")
        results[overlap, keep] = grads
    for variant in variants[1:]:
        for name, g in results[True, False].items():
            assert torch.equal(g, results[variant][name]), f"(overlap, keep_gathered)={variant}: gradient of {name}"


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_model_matches_tp1(tp_size, sp):
    run_on_ranks(_model_equals_one_process, tp_size, tp_size, sp)


@pytest.mark.parametrize("kv,tp_size", [(2, 2), (4, 2), (4, 4), (1, 2), (1, 4), (2, 4), (1, 8), (2, 8), (4, 8)])
@pytest.mark.parametrize("sp", [False, True])
def test_grouped_query_attention_matches_tp1(kv, tp_size, sp):
    """tp ≤ kv splits the kv heads; tp > kv gives each rank a copy of its kv head (tp/kv ranks
    share one), whose gradients must add up to the one process's. 8 query heads."""
    gqa = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=kv, vocab_size=250, multiple_of=16, max_seq_len=32)
    run_on_ranks(_model_equals_one_process, tp_size, tp_size, sp, cfg=gqa)


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("sp", [False, True])
def test_recompute_under_tensor_and_sequence_parallelism(recompute, sp):
    run_on_ranks(_model_equals_one_process, 2, 2, sp, recompute)


def _bad_layout(tp_size, cfg, seq_len, sp):
    tp = TensorParallel(topology(tp=tp_size).tp_group, sp=sp)
    try:
        model = Transformer(cfg, tp=tp, attention="sdpa")
        model(torch.zeros(1, seq_len, dtype=torch.long))
    except ValueError as err:
        return str(err)
    return None


def test_layouts_that_cannot_split_fail_clearly_before_any_collective():
    msgs = run_on_ranks(_bad_layout, 4, 4, LlamaConfig(dim=48, n_layers=1, n_heads=6, vocab_size=64,
                                                       multiple_of=16, max_seq_len=32), 8, False)
    assert msgs[0] == "n_heads=6 is not divisible by tp=4; choose tp in [1, 2, 3, 6]"
    msgs = run_on_ranks(_bad_layout, 2, 2, LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=64,
                                                       multiple_of=5, max_seq_len=32), 8, False)
    assert msgs[0].startswith("ffn_dim=45 is not divisible by tp=2")
    msgs = run_on_ranks(_bad_layout, 2, 2, CFG, 15, True)
    assert msgs[0].startswith("seq_len=15 is not divisible by tp=2: sequence parallelism")
    msgs = run_on_ranks(_bad_layout, 4, 4, LlamaConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=64,
                                                       multiple_of=16, max_seq_len=32), 8, False)
    assert msgs[0] is None  # tp 4 over 2 kv heads: two copies of each


def test_a_tp_that_neither_divides_nor_is_a_multiple_of_the_kv_heads_is_one_line():
    cfg = LlamaConfig(dim=96, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=64, ffn_hidden=96)
    with pytest.raises(ValueError) as err:
        check_tensor_parallel(cfg, 6)
    assert str(err.value) == ("tp=6 neither divides n_kv_heads=4 nor is a multiple of it: a tp rank holds whole kv "
                              "heads, or a copy of one; choose tp in [1, 2, 4, 12]")
