"""Validation during training (llama/validation.py): it leaves the training bit-identical, its
loss is the model's mean loss on the same held-out batches at every layout, and bad input is
one line before the rendezvous."""
import contextlib
import functools
import json
import math

import numpy as np
import pytest
import torch

from llama import train as train_module
from llama.demo_corpus import prose_text
from llama.evaluate import perplexity
from llama.model import Transformer
from llama.shards import ShardWriter
from llama.train import ByteDemoData, main, train
from parallel import comm
from parallel.params import full_tensor
from tests.distributed import run_on_ranks, topology
from tests.llama.test_train_layouts import _run_config, _text

STEPS, EVERY, ITERS, GLOBAL_BATCH, SEQ = 7, 2, 3, 8, 16
VALIDATED = [1, 3, 5, 6]  # the steps after which the weights are validated: every 2nd, and the last

LAYOUTS = {  # name: (tp, pp, dp, train config)
    "one process": (1, 1, 1, {}),
    "tp2 x pp2, sp": (2, 2, 1, dict(sp=True)),
    "pp2 interleaved x dp2, ZeRO-1, overlapped gathers": (1, 2, 2, dict(
        schedule="interleaved", vpp=2, distributed_optimizer=True, overlap_param_gather=True, bucket_mb=0.002)),
}


def write_held_out(prefix) -> str:
    """A byte-level token shard of 4000 tokens of text the training stream does not read."""
    w = ShardWriter(prefix, 256)
    w.add(np.frombuffer(prose_text(max_bytes=60_000).encode()[-4000:], dtype=np.uint8))
    w.close()
    return str(prefix)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    return write_held_out(tmp_path_factory.mktemp("held_out") / "prose")


@contextlib.contextmanager
def _lazy_gathers():
    """Parameter all-gathers that fill their output only when waited for (NaN until then), as in
    tests/parallel/test_param_gather_overlap.py: a forward that reads a weight early gets NaN."""
    start = comm.all_gather_into_start

    def lazy(out, shard, group):
        mine = shard.clone()
        out.fill_(float("nan"))
        return lambda: start(out, mine, group)()

    comm.all_gather_into_start = lazy
    try:
        yield
    finally:
        comm.all_gather_into_start = start


def _train(tp, pp, eval_data, **kw) -> dict:
    """A run's losses, gradient norms, validation losses, logical weights (dp rank 0) and RNG state."""
    topo = topology(tp=tp, pp=pp)
    evals = dict(eval_data=eval_data, eval_every=EVERY, eval_iters=ITERS) if eval_data else {}
    run = _run_config(tp=tp, pp=pp, steps=STEPS, global_batch=GLOBAL_BATCH, **evals, **kw)
    with _lazy_gathers() if run.train.overlap_param_gather else contextlib.nullcontext():
        result = train(run, topo, show_progress=False, data=ByteDemoData(SEQ, run.train.seed, _text()))
    weights = {}
    if topo.dp_rank == 0:
        for chunk in result.chunks:
            for name, p in chunk.named_parameters():
                weights[name] = full_tensor(p.detach(), p, topo.tp_group).clone()
    return dict(losses=result.losses, grad_norms=result.grad_norms, val=result.val_losses, weights=weights,
                rng=torch.get_rng_state())


@functools.cache
def _runs(layout: str, eval_data: str) -> tuple[list, list]:
    """Per rank, the layout's run without and with validation."""
    tp, pp, dp, kw = LAYOUTS[layout]
    if tp * pp * dp == 1:
        return [_train(1, 1, None, **kw)], [_train(1, 1, eval_data, **kw)]
    return tuple(run_on_ranks(_train, tp * pp * dp, tp, pp, path, **kw, timeout=120) for path in (None, eval_data))


def _weights(outs) -> dict:
    return {name: w for out in outs for name, w in out["weights"].items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_validation_leaves_the_training_bit_identical(layout, held_out):
    plain, validated = _runs(layout, held_out)
    for a, b in zip(plain, validated):
        assert a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
        assert torch.equal(a["rng"], b["rng"])
        assert a["val"] == {} and list(b["val"]) == VALIDATED
        assert b["val"] == validated[0]["val"], "every rank knows the validation loss"
    a, b = _weights(plain), _weights(validated)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_validation_loss_is_the_mean_loss_on_the_held_out_batches(layout, held_out):
    """Against one process at the same steps, and against the one-process model holding this
    layout's final weights, scored by llama-eval's perplexity on the shard's first ITERS × batch windows."""
    validated = _runs(layout, held_out)[1]
    val = validated[0]["val"]
    for step, want in _runs("one process", held_out)[1][0]["val"].items():
        assert abs(val[step] - want) <= 1e-5 * want, f"step {step}: {val[step]} vs one process {want}"
    model = Transformer(_run_config().model, attention="sdpa")
    model.load_state_dict(_weights(validated))
    want = perplexity(model, held_out, SEQ, max_windows=ITERS * GLOBAL_BATCH)["loss"]
    assert abs(val[STEPS - 1] - want) <= 1e-5 * want, f"{val[STEPS - 1]} vs {want}"


def tiny_run_args() -> list[str]:
    """llama-train on a tiny model and the byte-level demo corpus (patch its text to _text())."""
    return ["--steps", str(STEPS), "--seq-len", str(SEQ), "--global-batch-size", str(GLOBAL_BATCH),
            "--micro-batch-size", "2", "--dtype", "fp32", "--set", "model.dim=32", "--set", "model.n_layers=2",
            "--set", "model.n_heads=4", "--set", "model.vocab_size=256", "--set", "model.multiple_of=16",
            "--set", "data.sources=[]", "--set", "data.tokenizer=''", "--set", "train.attention=sdpa"]


def test_validation_in_the_metrics_the_log_lines_and_the_summary(held_out, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "prose_text", lambda max_bytes: _text())
    metrics = tmp_path / "metrics.jsonl"
    evals = ["--eval-data", held_out, "--eval-every", "2", "--eval-iters", "3"]
    assert main([*tiny_run_args(), *evals, "--metrics", str(metrics), "--no-progress"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == VALIDATED
    for r in records:
        if "val_loss" in r:
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
            assert f"step {r['step']} loss" in out and f"val_loss {r['val_loss']:.4f}" in out
    assert f"validation loss {records[-1]['val_loss']:.3f}" in out.splitlines()[-1]


BAD = [
    (["--eval-data", "/nonexistent/held"], "shard file '/nonexistent/held.idx' does not exist"),
    (["--eval-data", "{held}", "--eval-iters", "100"],
     "has 4000 tokens, too few for eval_iters=100 batches of global_batch=8 windows of seq_len+1=17 tokens "
     "(12801 needed)"),
    (["--eval-data", "{held}", "--set", "model.vocab_size=100"], "outside model.vocab_size=100"),
    (["--eval-every", "0", "--eval-data", "{held}"], "argument --eval-every: 0 must be >= 1"),
    (["--eval-iters", "0", "--eval-data", "{held}"], "argument --eval-iters: 0 must be >= 1"),
    (["--eval-every", "5"], "eval_every=5 needs eval_data, a held-out token shard (--eval-data PATH)"),
    (["--set", "train.eval_every=-1"], "eval_every=-1 must be an integer >= 0"),
    (["--set", "train.eval_iters=0", "--eval-data", "{held}"], "eval_iters=0 must be a positive integer"),
]


@pytest.mark.parametrize("argv, want", BAD, ids=[want[:40] for _, want in BAD])
def test_bad_validation_input_is_one_line_before_the_rendezvous(argv, want, held_out, capsys, monkeypatch):
    def initialize(*args, **kwargs):
        raise AssertionError("the rendezvous started before the input was checked")

    monkeypatch.setattr(train_module, "initialize", initialize)
    try:
        code = main([*tiny_run_args(), *(a.format(held=held_out) for a in argv)])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("llama-train: error: ") and want in err[0], err


def test_a_fine_tuning_shard_is_refused_as_eval_data(tmp_path, capsys, monkeypatch):
    """Its windows would score the prompts and attend across examples: not the training loss."""
    prefix = tmp_path / "sft"
    w = ShardWriter(prefix, 256, with_mask=True)
    text = np.frombuffer(prose_text(max_bytes=60_000).encode()[-4000:], dtype=np.uint8)
    w.add(text, mask=np.ones(len(text), dtype=np.uint8))
    w.close()
    monkeypatch.setattr(train_module, "initialize", lambda *a, **k: pytest.fail("the rendezvous started"))
    assert main([*tiny_run_args(), "--eval-data", str(prefix)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is a fine-tuning shard (it has a .mask)" in err[0], err
