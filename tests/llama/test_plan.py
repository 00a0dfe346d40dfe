"""llama-plan: the paper's carbon table exactly, parameters from the real model, work counted on
the real layer against independent arithmetic, and bad input as one line."""
import math

import pytest

from llama.config import load_config
from llama.hardware import load
from llama.perf_model import Layout, accumulation, carbon, checkpoint_save, predict
from llama.plan import main, parse_amount
from llama.step_profile import profile

pytestmark = pytest.mark.timeout(120)

TABLE_15 = [(82_432, 36, 14), (135_168, 59, 23), (530_432, 233, 90), (1_022_362, 449, 173)]


@pytest.mark.parametrize("gpu_hours,mwh,tco2", TABLE_15)
def test_table_15_from_the_gpu_hours(gpu_hours, mwh, tco2):
    energy, co2 = carbon(gpu_hours, 400)
    assert math.floor(energy) == mwh  # the paper prints MWh truncated (449.8 → 449)
    assert round(co2) == tco2


def test_amounts_batches_in_powers_of_two_budgets_in_powers_of_ten():
    assert parse_amount("4M", 1024, "x") == 2048 * 2048
    assert parse_amount("1.4T", 1000, "x") == 1.4e12


def _tiny():
    run = load_config("tiny")
    run.data.sources, run.data.tokenizer = [], ""
    return run


def test_parameters_per_gpu_are_those_of_the_fullest_pipeline_rank():
    run = _tiny()
    m = run.model
    h, f, v = m.dim, m.ffn_dim, m.vocab_size
    layer = (4 * h * h + 3 * h * f) // 2 + 2 * h  # tp 2 halves the matrices, norms are whole
    first = v * h // 2 + 2 * layer
    last = 2 * layer + h + v * h // 2
    pred = predict(run, Layout(tp=2, pp=2, dp=1, micro_batch=8), load("a100-80gb"), 1e9)
    assert pred.params_per_gpu == max(first, last)


@pytest.mark.parametrize("recompute,extra", [("none", 0), ("full", 1)])
def test_layer_matmul_flops_are_counted_on_the_real_layer(recompute, extra):
    cfg = load_config("llama-7b").model
    b, s, tp = 1, 512, 4
    work = profile(cfg, tp, True, recompute, b, s)["layer"]
    params = (4 * cfg.dim ** 2 + 3 * cfg.dim * cfg.ffn_dim) / tp
    assert work.matmul_flops == pytest.approx((6 + 2 * extra) * b * s * params)
    heads = cfg.n_heads // tp  # causal flash attention: half of 4·b·s²·h per head, backward 2.5×
    assert work.attention_flops == pytest.approx((1 + extra + 2.5) * 2 * b * heads * s * s * cfg.head_dim)


def test_layer_collectives_are_those_the_traffic_test_expects():
    cfg = load_config("llama-7b").model
    work = profile(cfg, 2, True, "none", 1, 256)["layer"]
    assert work.collectives["all_gather"] == 6 and work.collectives["reduce_scatter"] == 4


def test_the_paper_layout_holds_its_rank_shapes_in_bf16_with_zero1():
    run = load_config("llama-65b")
    m = run.model
    pred = predict(run, Layout(8, 4, 64, 5, 1, True, "selective", True), load("a100-80gb"), 1.4e12)
    layer = (4 * m.dim ** 2 + 3 * m.dim * m.ffn_dim) // 8 + 2 * m.dim  # from the config's shapes, tp 8
    params = 20 * layer + m.vocab_size * m.dim // 8  # 5 chunks of 4 layers and one vocab-sharded matrix
    assert pred.params_per_gpu == params + m.dim  # the last stage's, with the final norm
    # the fullest in memory is pp rank 0 (the most micro-batches in flight), without that norm
    assert pred.memory["weights"] == 2 * params  # bf16
    assert pred.memory["gradients"] == pytest.approx(4 * params, rel=1e-3)  # fp32 buckets, padded to dp
    assert pred.memory["optimizer"] == pytest.approx(12 * params / 64, rel=1e-3)  # master, m, v over dp 64
    assert pred.fits and pred.memory["total"] < 40 * 2**30
    assert pred.days == pytest.approx(1.4e12 / (pred.tokens_per_s_per_gpu * 2048) / 86400)
    # a save: bf16 weights and fp32 master, m and v of every parameter, once (the fullest stage's
    # share times 2048: within 1%); per GPU against the real writer in tests/parallel/test_checkpoint_pieces.py
    save = checkpoint_save(pred, run, load("a100-80gb"), 2.0)
    assert save["total_bytes"] == pytest.approx(m.num_params() * 14, rel=0.01)


def test_the_overlapped_parameter_gather_hides_behind_one_forward_at_most():
    run = load_config("llama-65b")
    layout = Layout(8, 4, 64, 5, 1, True, "selective", True)
    off = predict(run, layout, load("a100-80gb"), 1.4e12)
    run.train.overlap_param_gather = True
    on = predict(run, layout, load("a100-80gb"), 1.4e12)
    first_forward = (off.time["compute"] + off.time["tp_comm"]) / accumulation(layout.apply(run)) / 3 / 5
    assert off.time["dp_comm"] - first_forward <= on.time["dp_comm"] < off.time["dp_comm"]
    assert on.time["total"] < off.time["total"]
    without_zero = Layout(8, 4, 64, 5, 1, True, "selective", False)  # nothing to gather: the flag changes nothing
    assert predict(run, without_zero, load("a100-80gb"), 1.4e12).time == \
        predict(load_config("llama-65b"), without_zero, load("a100-80gb"), 1.4e12).time


@pytest.mark.parametrize("argv,message", [
    (["--gpu", "b300"], "unknown --gpu 'b300'"),
    (["--tokens", "0"], "--tokens='0' must be positive"),
    (["--config", "llama-65b", "--gpus", "2048", "--tp", "8", "--pp", "3"], "is not divisible by tp*pp=8*3"),
    (["--config", "llama-65b", "--gpus", "1"], "fits no layout of 1 x a100-80gb"),
    (["--gpus", "16", "--tp", "16"], "tp=16 would span nodes"),
    (["--write-gbps-per-node", "0"], "--write-gbps-per-node=0 must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("preset", ["llama3.1-8b", "llama3.2-1b"])
def test_presets_with_rope_scaling_and_tied_embeddings_are_planned(preset):
    """rope_scaling is a mapping: the planner's caches key on the config's hashable form."""
    run = load_config(preset, {"train": {"seq_len": 2048}})
    pred = predict(run, Layout(tp=4, pp=2, dp=1, micro_batch=1), load("a100-80gb"), 1e9)
    assert pred.params_per_gpu > 0 and pred.time["total"] > 0 and pred.tokens_per_s_per_gpu > 0
