"""ZeRO-1 with the parameter all-gather overlapped with the next forward (`overlap_param_gather`).

The step only launches the gathers; each module waits for its own bucket just before its
forward. Checked here: the gathers really are still in flight while the first layers compute
(and done, on every rank alike, when the forward ends), and training is bit-identical with the
overlap on and off, and equal to one process. In that check the gathers are made lazy and the
parameters they will fill are NaN until they are waited for: a weight read before its wait
(which on a fast loopback would usually read the right bytes by luck) spoils the run.
"""
import torch

from llama.config import LlamaConfig
from llama.model import Transformer
from parallel import comm
from parallel.data_parallel import GradBuckets
from parallel.optimizer import Optimizer
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology
from tests.llama.test_train_layouts import _assert_same_run, _train_on_ranks

CFG = LlamaConfig(dim=32, n_layers=4, n_heads=4, vocab_size=256, multiple_of=16, max_seq_len=16)


def _pending_per_layer():
    topo = topology()  # dp = 2
    model = Transformer(CFG, attention="sdpa")
    init_parameters(model, 0)
    buckets = GradBuckets(list(model.parameters()), topo.dp_group, bucket_mb=0.005, reduce_scatter=True)
    opt = Optimizer(buckets, topo, 1e-2, distributed=True, overlap_param_gather=True)
    opt.wait_before_forward([model])
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(topo.dp_rank))
    buckets.start_step(1)
    model(tokens, tokens).backward()
    opt.step(1e-2)
    launched = len(opt._gathers)
    pending = []  # gathers still in flight as each layer starts
    for layer in model.layers.values():
        layer.register_forward_pre_hook(lambda *_: pending.append(len(opt._gathers)))
    model(tokens, tokens)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return dict(buckets=len(buckets.buckets), launched=launched, pending=pending, after=len(opt._gathers),
                params=flat)


def test_the_forward_waits_bucket_by_bucket_while_later_gathers_are_in_flight():
    outs = run_on_ranks(_pending_per_layer, 2, timeout=120)
    for out in outs:
        assert out["buckets"] >= CFG.n_layers, "the test needs about one bucket per layer"
        assert out["launched"] == out["buckets"], "step() must leave every bucket's gather in flight"
        pending = out["pending"]
        assert pending == sorted(pending, reverse=True) and pending[-1] > 0, \
            f"gathers in flight at each layer's start {pending}: the last layers' must wait until they run"
        assert out["after"] == 0
    assert torch.equal(outs[0]["params"], outs[1]["params"]), \
        "after the forward every dp rank must hold every rank's updated slice"


def _train_with_lazy_gathers(tp, pp, **kw):
    start = comm.all_gather_into_start

    def lazy(out, shard, group):
        mine = shard.clone()
        out.fill_(float("nan"))  # what a forward reading before its wait would see
        return lambda: start(out, mine, group)()

    comm.all_gather_into_start = lazy
    try:
        return _train_on_ranks(tp, pp, **kw)
    finally:
        comm.all_gather_into_start = start


def test_training_is_bit_identical_with_the_parameter_gather_overlapped():
    kw = dict(distributed_optimizer=True, bucket_mb=0.002, timeout=300)  # about a bucket per weight
    off = run_on_ranks(_train_with_lazy_gathers, 8, 2, 1, **kw)  # tp 2 x dp 4
    on = run_on_ranks(_train_with_lazy_gathers, 8, 2, 1, overlap_param_gather=True, **kw)
    for a, b in zip(off, on):
        assert a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
        assert a["weights"].keys() == b["weights"].keys()
        for name in a["weights"]:
            assert torch.equal(a["weights"][name], b["weights"][name]), name
    _assert_same_run(on, "tp=2 dp=4 ZeRO-1 with overlap_param_gather")
