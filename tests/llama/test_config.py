"""The presets reproduce the LLaMA paper (Table 2, section 2.3) and bad values fail with one clear line."""
from __future__ import annotations

import re

import pytest
import torch

from llama.config import ConfigError, LlamaConfig, ffn_hidden_size, load_config
from llama.model import Transformer

pytestmark = pytest.mark.timeout(60)

# Parameter counts of Meta's released checkpoints (sum of numel over the consolidated weights) and
# the FFN widths of their params.json / weight shapes.
PRESETS = {
    "llama-7b": dict(params=6_738_415_616, ffn_dim=11008, lr=3.0e-4),
    "llama-13b": dict(params=13_015_864_320, ffn_dim=13824, lr=3.0e-4),
    "llama-33b": dict(params=32_528_943_616, ffn_dim=17920, lr=1.5e-4),
    "llama-65b": dict(params=65_285_660_672, ffn_dim=22016, lr=1.5e-4),
}


# LLaMA 2 and 3: the counts issue 19 gives, which transformers' own model of the same config has too
LATER_PRESETS = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192,
                 "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
                 "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496,
                 "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824}  # tied: the head counted once


@pytest.mark.parametrize("name", list(LATER_PRESETS))
def test_llama2_and_llama3_presets_count_what_transformers_counts(name):
    import transformers

    from llama.formats import hf_config
    cfg = load_config(name).model
    ours = sum(p.numel() for p in Transformer(cfg, device="meta").parameters())
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg)))
                     .parameters())
    assert ours == theirs == cfg.num_params() == LATER_PRESETS[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_on_meta_device(name):
    cfg = load_config(name).model
    assert cfg.ffn_dim == PRESETS[name]["ffn_dim"]
    model = Transformer(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PRESETS[name]["params"]


def test_meta_device_context_manager():
    cfg = load_config("llama-7b").model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PRESETS["llama-7b"]["params"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_training_hyperparameters(name):
    train = load_config(name).train
    assert train.lr == PRESETS[name]["lr"]
    assert train.beta1 == 0.9
    assert train.beta2 == 0.95
    assert train.weight_decay == 0.1
    assert train.grad_clip == 1.0
    assert train.warmup_steps == 2000
    assert train.min_lr_ratio == 0.1
    assert train.global_batch * train.seq_len == 4_194_304  # 4M tokens per step


def _raises_one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"multi-line message: {message!r}"
    return message


def test_dim_not_divisible_by_heads():
    _raises_one_line(r"dim=100.*n_heads=3", LlamaConfig, dim=100, n_heads=3)


def test_kv_heads_that_do_not_divide_the_heads():
    _raises_one_line(r"n_kv_heads=3 does not divide n_heads=8", LlamaConfig, dim=64, n_heads=8, n_kv_heads=3)


def test_rope_scaling_kinds_we_do_not_know_and_bad_values_are_one_line():
    _raises_one_line(r"rope_scaling type 'yarn' is not supported; known: \['llama3'\]", LlamaConfig,
                     rope_scaling={"rope_type": "yarn", "factor": 4.0})
    _raises_one_line(r"rope_scaling factor=0 must be a positive number", LlamaConfig,
                     rope_scaling={"type": "llama3", "factor": 0})
    _raises_one_line(r"low_freq_factor=4.0 must be below high_freq_factor=1.0", LlamaConfig,
                     rope_scaling={"rope_type": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 1.0})
    assert LlamaConfig(rope_scaling={"rope_type": "default"}).rope_scaling is None  # HF's word for none
    assert LlamaConfig(rope_scaling={"type": "llama3", "factor": 32.0}).rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def test_odd_head_dim():
    _raises_one_line(r"head_dim=3\b", LlamaConfig, dim=12, n_heads=4)


@pytest.mark.parametrize("field,value", [("n_layers", 0), ("vocab_size", -1), ("dim", 0), ("n_heads", -4),
                                         ("norm_eps", 0.0), ("max_seq_len", 0)])
def test_non_positive_sizes(field, value):
    _raises_one_line(rf"{field}={re.escape(repr(value))}", LlamaConfig, **{field: value})


def test_unknown_preset():
    _raises_one_line(r"llama-3b", load_config, "llama-3b")


def test_unknown_key_in_overrides():
    _raises_one_line(r"bogus", load_config, "tiny", {"model": {"bogus": 1}})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def _expected_ffn(dim: int, multiple_of: int) -> int:
    # Meta: hidden = int(2 * (4 * dim) / 3), then rounded up to a multiple of multiple_of.
    hidden = (8 * dim) // 3  # integer arithmetic, no float
    return -(-hidden // multiple_of) * multiple_of


@pytest.mark.parametrize("dim,multiple_of", [(4096, 256), (5120, 256), (6656, 256), (8192, 256), (64, 16),
                                             (128, 32), (96, 32), (48, 128), (100, 7), (1, 1)])
def test_ffn_hidden_size_rounds_up(dim, multiple_of):
    got = ffn_hidden_size(dim, multiple_of)
    assert got == _expected_ffn(dim, multiple_of)
    assert got % multiple_of == 0 and 0 <= got - (8 * dim) // 3 < multiple_of


def test_ffn_hidden_size_exact_multiple_is_not_bumped():
    assert ffn_hidden_size(96, 32) == 256  # 8*96/3 = 256 exactly
    assert ffn_hidden_size(64, 16) == 176  # 170.67 -> 170 -> 176
    assert LlamaConfig(dim=64, n_heads=4, multiple_of=16).ffn_dim == 176


def test_a_misspelt_override_section_fails():
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        load_config("tiny", {"trian": {"lr": 1.0}})


@pytest.mark.parametrize("value", [True, 64.0, "64"])
def test_sizes_must_be_integers(value):
    with pytest.raises(ConfigError, match="must be a positive integer"):
        LlamaConfig(dim=value, n_heads=4)


def test_what_tensor_shapes_do_not_show_is_compared_with_a_checkpoints_config():
    from llama.config import unseen_differences
    cfg = LlamaConfig(rope_theta=500000.0, rope_scaling={"rope_type": "llama3"})
    saved = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert unseen_differences(saved, cfg) == []  # missing values are 3.1's, as the config's
    assert unseen_differences({}, cfg) == [  # an older checkpoint: the defaults
        "rope_theta: 10000.0 in the checkpoint, 500000.0 in the config",
        f"rope_scaling: None in the checkpoint, {cfg.rope_scaling!r} in the config"]
    assert unseen_differences({"tie_word_embeddings": True, "norm_eps": 1e-5}, LlamaConfig()) == [
        "norm_eps: 1e-05 in the checkpoint, 1e-06 in the config",
        "tie_word_embeddings: True in the checkpoint, False in the config"]


def test_meta_params_of_llama32_small_models_scale_rope_by_32():
    """Meta's params.json for LLaMA 3.2 1B/3B says only use_scaled_rope; their factor is 32."""
    from llama.formats import meta_params, rope_scaling_from_meta
    for name, factor in (("llama3.2-1b", 32.0), ("llama3.2-3b", 32.0), ("llama3.1-8b", 8.0)):
        cfg = load_config(name).model
        params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "use_scaled_rope": True}
        assert rope_scaling_from_meta(params)["factor"] == factor, name
        assert rope_scaling_from_meta(meta_params(cfg)) == cfg.rope_scaling, name
