"""Checkpoints: bit-exact resume on the same layout, resharding resume on other layouts, a
process killed while writing, and damaged files."""
import os
import shutil
import tempfile

import pytest
import torch

from llama.train import ByteDemoData, CheckpointOptions, train
from parallel.checkpoint import CheckpointError, load_checkpoint, read_meta, resolve_checkpoint
from parallel.tensor_files import TensorFileError
from parallel.topology import build_topology
from tests.distributed import run_on_ranks, run_processes, topology
from tests.llama import test_train_layouts as layouts
from tests.llama.test_train_layouts import _run_config, _text


def _train(topo, steps, ckpt=None, **kw):
    """(losses, logical weights on dp rank 0) of a run of `steps` steps, saving or resuming per `ckpt`."""
    losses, weights, _, _ = layouts._train(topo, ckpt=ckpt, steps=steps, **kw)
    return losses, weights


def _on_ranks(tp, pp, steps, ckpt=None, **kw):
    return _train(topology(tp=tp, pp=pp), steps, ckpt, **kw)


def _merge(outs):
    losses, weights = outs[0][0], {}
    for _, w in outs:
        weights.update(w)
    return losses, weights


def test_resume_on_the_same_layout_is_bit_exact():
    root = tempfile.mkdtemp(prefix="ckpt-")
    try:
        straight = _merge(run_on_ranks(_on_ranks, 4, 2, 2, 20))
        first = _merge(run_on_ranks(_on_ranks, 4, 2, 2, 20, CheckpointOptions(root, save_every=10)))
        # throw away the end of that run: resume from step 10 as if it had died there
        shutil.rmtree(os.path.join(root, "step_000020"))
        with open(os.path.join(root, "latest"), "w") as f:
            f.write("step_000010\n")
        second = _merge(run_on_ranks(_on_ranks, 4, 2, 2, 20, CheckpointOptions(root, resume=root)))
        assert first[0] == straight[0]
        assert second[0] == straight[0][10:]  # identical floats at every step
        for name, w in straight[1].items():
            assert torch.equal(second[1][name], w), name
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _resume_elsewhere(tp, pp, root):
    return _on_ranks(tp, pp, 15, CheckpointOptions(resume=root), distributed_optimizer=pp == 1 and tp == 4)


@pytest.mark.parametrize("tp,pp,dp", [(4, 1, 2), (1, 1, 1), (1, 2, 4)])
def test_resume_on_another_layout_continues_the_run(tp, pp, dp, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    kw = dict(sp=True, distributed_optimizer=True)
    straight = _merge(run_on_ranks(_on_ranks, 8, 2, 2, 15, **kw))[0]
    run_on_ranks(_on_ranks, 8, 2, 2, 15, CheckpointOptions(root, save_every=10), **kw)
    shutil.rmtree(os.path.join(root, "step_000015"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_000010\n")
    assert read_meta(root)["layout"] == {"tp": 2, "pp": 2, "dp": 2, "distributed_optimizer": True}
    if tp * pp * dp == 1:
        resumed = _train(build_topology(), 15, CheckpointOptions(resume=root))[0]
    else:
        resumed = run_on_ranks(_resume_elsewhere, tp * pp * dp, tp, pp, root)[0][0]
    assert len(resumed) == 5
    for got, want in zip(resumed, straight[10:]):
        assert abs(got - want) <= 1e-4 * abs(want), (resumed, straight[10:])


def _killed_while_saving(root):
    import parallel.tensor_files as tf
    topo = topology(tp=1, pp=1)
    _train(topo, 2, CheckpointOptions(root))  # a complete checkpoint at step 2
    real_write = tf.StreamingSafetensorsWriter.write

    def write_then_die(self, name, tensor):
        real_write(self, name, tensor)
        self.file.flush()
        os._exit(9)  # killed in the middle of the file
    tf.StreamingSafetensorsWriter.write = write_then_die
    _train(topo, 4, CheckpointOptions(root, resume=root))


def test_a_process_killed_while_writing_leaves_latest_on_the_previous_checkpoint():
    root = tempfile.mkdtemp(prefix="ckpt-kill-")
    try:
        out = run_processes(_killed_while_saving, 2, root, timeout=120)
        assert "exit code 9" in out.values(), out
        assert open(os.path.join(root, "latest")).read().strip() == "step_000002"
        assert os.path.isdir(os.path.join(root, "step_000004.tmp"))  # the partial one, never renamed
        resumed = _train(build_topology(), 4, CheckpointOptions(resume=root))[0]
        assert len(resumed) == 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_damaged_files_give_errors_naming_them(tmp_path):
    topo = build_topology()
    _train(topo, 1, CheckpointOptions(str(tmp_path)))
    ckpt = resolve_checkpoint(tmp_path)
    model_file = ckpt / "shards" / "rank00000.safetensors"
    raw = model_file.read_bytes()
    model_file.write_bytes(raw[: len(raw) // 2])
    run = _run_config(steps=1)
    from llama.parallelize import build_chunks
    chunks = build_chunks(run.model, topo, seed=0)
    with pytest.raises(TensorFileError, match=r"'.*shards/rank00000.safetensors' is truncated"):
        load_checkpoint(ckpt, chunks, None, topo)
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "nowhere", chunks, None, topo)
    model_file.write_bytes(raw)
    other = build_chunks(_run_config(steps=1).model.__class__(dim=64, n_layers=4, n_heads=4, vocab_size=256,
                                                               multiple_of=16, max_seq_len=16), topo, seed=0)
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight has shape \(256, 32\), the model expects "
                                              r"\(256, 64\)"):
        load_checkpoint(ckpt, other, None, topo)


def _init_from_a_smaller_model(root):
    run = _run_config(pp=2, steps=1)
    run.model.n_layers = 6  # asked of a 4-layer checkpoint: stage 1's layers 4, 5 are missing, stage 0's are not
    try:
        train(run, topology(tp=1, pp=2), show_progress=False, data=ByteDemoData(16, 0, _text()),
              ckpt=CheckpointOptions(init_from=root))
    except Exception as err:  # every rank must fail, none may wait for the others
        return f"{type(err).__name__}: {err}"
    return "ok"


def test_a_checkpoint_some_stages_cannot_load_fails_on_every_rank(tmp_path):
    _train(build_topology(), 1, CheckpointOptions(str(tmp_path)))
    out = run_on_ranks(_init_from_a_smaller_model, 2, str(tmp_path))
    assert out[1].startswith("CheckpointError: checkpoint '") and "has no tensor 'layers.4" in out[1], out
    assert out[0] == "CheckpointError: another rank could not load the checkpoint (its error says why)", out


def _bf16_zero1_checkpoint_resumed_in_fp32(root):
    from llama.config import LlamaConfig
    from llama.model import Transformer
    from parallel.checkpoint import save_checkpoint
    from parallel.data_parallel import GradBuckets
    from parallel.optimizer import Optimizer
    from parallel.params import init_parameters
    topo = topology(tp=1, pp=1)  # dp = 2
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)

    def build(dtype):
        model = Transformer(cfg, attention="sdpa", dtype=dtype)
        init_parameters(model, 0)
        buckets = GradBuckets(list(model.parameters()), topo.dp_group, reduce_scatter=True)
        return model, buckets, Optimizer(buckets, topo, 1e-2, distributed=True)

    model, buckets, opt = build(torch.bfloat16)
    for step in range(2):
        buckets.start_step(1)
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(topo.dp_rank + 7 * step))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step(1e-2)
    save_checkpoint(root, 2, [model], opt, topo, meta={"consumed_samples": 0})
    resumed, _, resumed_opt = build(torch.float32)
    load_checkpoint(root, [resumed], resumed_opt, topo)
    flat = torch.cat([p.detach().reshape(-1) for p in resumed.parameters()])
    rank0 = flat.clone()
    torch.distributed.broadcast(rank0, 0)
    return (flat - rank0).abs().max().item()


def test_a_bf16_zero1_checkpoint_resumed_in_fp32_gives_every_rank_the_same_weights(tmp_path):
    """In fp32 the parameters are the master weights: each dp rank loads its slice of the fp32
    masters into them, and the slices must then be gathered, or the replicas differ."""
    outs = run_on_ranks(_bf16_zero1_checkpoint_resumed_in_fp32, 2, str(tmp_path))
    assert outs == [0.0, 0.0]
