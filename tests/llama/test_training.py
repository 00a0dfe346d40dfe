"""The trainer's parts: gradient accumulation, overlapped bucket reduction, the distributed
optimizer's memory, the skipping of non-finite steps, and the command line's checks."""
import math

import numpy as np
import pytest
import torch

from llama.config import ConfigError, LlamaConfig
from llama.model import Transformer
from llama.train import ByteDemoData, check_batch, main, train
from parallel.data_parallel import GradBuckets
from parallel.layers import ColumnParallelLinear, TensorParallel
from parallel.params import init_parameters
from parallel.topology import build_topology
from tests.distributed import run_on_ranks, topology
from tests.llama.test_train_layouts import _run, _run_config, _text, rel_err


def _single(**kw):
    run = _run_config(**kw)
    return train(run, build_topology(), show_progress=False, data=ByteDemoData(16, run.train.seed, _text()))


def test_eight_micro_batches_of_one_equal_one_of_eight():
    """Accumulation averages over micro-batches: the loss, the gradient norm and the gradients of
    the first and last steps, and the weights equal one micro-batch of 8. The clip acts at some
    steps and not at others, so gradients summed instead of averaged would change the weights."""
    kw = dict(global_batch=8, steps=5, grad_clip=1.1, record_gradients=True)
    a = _run(build_topology(), micro_batch=1, **kw)
    b = _run(build_topology(), micro_batch=8, **kw)
    assert min(b["grad_norms"]) < kw["grad_clip"] < max(b["grad_norms"]), b["grad_norms"]
    for key in ("grad_norms", "losses"):
        for step, (x, y) in enumerate(zip(a[key], b[key])):
            assert abs(x - y) <= 1e-5 * abs(y), f"step {step}: {key} {x} vs {y}"
    for step, ga, gb in zip((0, 4), a["grads"], b["grads"]):
        for name, g in ga.items():
            assert rel_err(g, gb[name]) <= 1e-5, f"step {step}: gradient of {name} {rel_err(g, gb[name]):.3g}"
    for name, w in a["weights"].items():
        assert torch.allclose(w, b["weights"][name], rtol=1e-5, atol=1e-6), name


def _bucket_gradients_against_autograd(tp_size, dtype, sp):
    """Two micro-batches through buckets (fp32: the weight-gradient GEMMs write into the bucket;
    bf16: copied, then added; under sp the buckets sum the norms' gradients across tp) against
    the same model's plain autograd gradients, summed in fp32."""
    tp = TensorParallel(topology(tp=tp_size, pp=1).tp_group, sp=sp) if tp_size > 1 else TensorParallel()
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)
    models = [Transformer(cfg, tp=tp, attention="sdpa", dtype=dtype) for _ in range(2)]
    for model in models:
        init_parameters(model, 0)
    buckets = GradBuckets(list(models[0].parameters()), None, tp_group=tp.group)
    summed_by_buckets = [p for p in models[0].parameters() if getattr(p, "grad_summed_by_buckets", False)]
    assert len(summed_by_buckets) == (2 * cfg.n_layers + 1 if sp else 0)  # the norms
    buckets.start_step(2)
    reference = {name: torch.zeros(p.shape) for name, p in models[1].named_parameters()}
    for micro in range(2):
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(micro))
        models[0](tokens[:, :-1], tokens[:, 1:]).backward()
        models[1](tokens[:, :-1], tokens[:, 1:]).backward()
        for name, p in models[1].named_parameters():
            reference[name] += p.grad.float()
            p.grad = None
    buckets.finish()
    for name, p in models[0].named_parameters():
        assert p.grad is None
        # bf16: the reference rounds each micro-batch's embedding gradient (and under sp its
        # tp-summed norm gradients) to bf16; the buckets sum the rows (partial gradients) in fp32
        rounded = name == "tok_embeddings.weight" or (sp and "norm" in name)
        tol = 2 ** -8 if dtype == torch.bfloat16 and rounded else 1e-6
        diff = (p.main_grad - reference[name]).abs().max().item()
        assert diff <= tol * max(1.0, reference[name].abs().max().item()), f"{name}: {diff:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bucket_gradients_equal_autograd(dtype):
    _bucket_gradients_against_autograd(1, dtype, False)
    run_on_ranks(_bucket_gradients_against_autograd, 2, 2, dtype, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_weight_used_twice_is_counted_once(dtype):
    """A layer applied twice in one backward (fp32: both of its gradient GEMMs write into the
    bucket) is counted once, and over two steps the second holds only its own gradient."""
    def build():
        layers = torch.nn.ModuleList([ColumnParallelLinear(8, 8, dtype=dtype) for _ in range(2)])
        init_parameters(layers, 0)
        return layers

    ours, ref = build(), build()
    buckets = GradBuckets(list(ours.parameters()), None)
    for step in range(2):
        x = torch.randn(2, 3, 8, dtype=dtype, generator=torch.Generator().manual_seed(step))
        buckets.start_step(1)
        ref.zero_grad(set_to_none=True)
        for model in (ours, ref):
            model[1](model[0](model[0](x))).sum().backward()
        buckets.finish()  # raised "still waiting for -1 gradients" when a second use counted twice
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert torch.allclose(p.main_grad, q.grad.float(), rtol=1e-5, atol=1e-6), (step, name)


def _first_bucket_launches_during_backward(overlap):
    topo = topology(tp=1, pp=1)  # dp = 2
    cfg = LlamaConfig(dim=32, n_layers=4, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)
    model = Transformer(cfg, attention="sdpa")
    init_parameters(model, 0)
    buckets = GradBuckets(list(model.parameters()), topo.dp_group, bucket_mb=0.01, overlap=overlap)
    launched_before_embedding_grad = []
    # the embedding's gradient is the last one backward produces
    model.tok_embeddings.weight.register_hook(lambda g: launched_before_embedding_grad.append(
        list(buckets.launch_order)))
    buckets.start_step(1)
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens, tokens).backward()
    during = launched_before_embedding_grad[0]
    buckets.finish()
    return len(buckets.buckets), during, buckets.launch_order


def test_bucket_reductions_start_while_backward_is_running():
    n, during, order = run_on_ranks(_first_bucket_launches_during_backward, 2, True)[0]
    assert n > 3 and len(during) >= n - 2  # nearly all buckets went out before backward reached the embedding
    assert sorted(order) == list(range(n))
    n, during, order = run_on_ranks(_first_bucket_launches_during_backward, 2, False)[0]
    assert during == [] and sorted(order) == list(range(n))  # overlap off: all in finish()


def _optimizer_state(distributed):
    from tests.llama.test_train_layouts import _train
    return _train(topology(tp=1, pp=1), distributed_optimizer=distributed)[3]


def test_distributed_optimizer_holds_a_dp_th_of_the_state():
    replicated = run_on_ranks(_optimizer_state, 2, False)
    sharded = run_on_ranks(_optimizer_state, 2, True)
    ratio = sharded[0] / replicated[0]
    print(f"\noptimizer state per rank, dp=2: replicated {replicated[0]:,} B, distributed {sharded[0]:,} B "
          f"(ratio {ratio:.3f})")
    assert sum(sharded) == pytest.approx(replicated[0], rel=0.01) and 0.49 <= ratio <= 0.51


def test_a_non_finite_step_is_skipped_and_training_goes_on():
    run = _single(inject_fault="nan@0:3", steps=8)
    assert run.skipped == [3] and math.isnan(run.losses[3]) and math.isnan(run.grad_norms[3])
    assert all(math.isfinite(x) for i, x in enumerate(run.losses) if i != 3)
    clean = _single(steps=8)
    assert run.losses[:3] == clean.losses[:3]
    assert run.losses[4] != clean.losses[4]  # step 3's update really was not applied
    assert run.losses[-1] < run.losses[0]


def test_the_global_batch_must_split_into_micro_batches_and_dp():
    assert check_batch(32, 4, 2) == 4
    with pytest.raises(ConfigError, match=r"global_batch=30 is not divisible by micro_batch\*dp=4\*2"):
        check_batch(30, 4, 2)


def test_command_line_errors_are_one_line(capsys):
    assert main(["--config", "tiny", "--global-batch-size", "30", "--micro-batch-size", "4", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama-train: error: global_batch=30") and "\n" not in err
    assert main(["--config", "tiny", "--tp", "3"]) == 2
    assert "world size 1 is not divisible by tp*pp=3*1" in capsys.readouterr().err


def test_training_on_token_shards_lowers_the_loss(tmp_path):
    from llama.shards import ShardWriter
    rng = np.random.default_rng(0)
    for name, period in (("a", 5), ("b", 7)):  # two learnable sources: repeating sequences
        w = ShardWriter(tmp_path / name, 256)
        for _ in range(20):
            w.add(np.tile(rng.integers(0, 256, period), 40))
        w.close()
    run = _run_config(steps=40, lr=1e-2)
    run.data.sources = [{"path": str(tmp_path / "a"), "weight": 0.7}, {"path": str(tmp_path / "b"), "weight": 0.3}]
    result = train(run, build_topology(), show_progress=False)
    assert result.consumed_samples == 40 * 8
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_a_missing_shard_is_a_one_line_error(capsys):
    assert main(["--config", "tiny", "--set", "data.sources=[{path: /nonexistent/shard}]", "--set", "data.tokenizer=''",
                 "--set", "model.vocab_size=256", "--steps", "1"]) == 2
    assert "shard file '/nonexistent/shard.idx' does not exist" in capsys.readouterr().err
