"""Names, layouts and configs of the three checkpoint formats, as data (torchtitan's
state-dict adapter): ours (`native`, Meta's names, layout-free), Meta's original release
(`meta`) and Hugging Face transformers' Llama (`hf`).

Meta's `consolidated.NN.pth` files are fairscale's tensor-parallel shards: tok_embeddings split
on dim 1; wq, wk, wv, w1, w3 and output on dim 0; wo and w2 on dim 1; norms replicated.
HF's Llama rotates the halves of each head (rotate_half) where Meta rotates consecutive pairs,
so HF stores wq and wk with the rows of every head permuted (llama-paper-facts.md).
"""
from __future__ import annotations

import re

import torch

from llama.config import LLAMA3_ROPE_SCALING, LlamaConfig, ffn_hidden_size

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")

META_SPLIT_DIM = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
                  "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
                  "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
                  "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None}

_HF_LAYER = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
             "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def native_names(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every logical tensor of the model, in model order, with its shape."""
    d, f, v, kv = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.kv_dim
    out = [("tok_embeddings.weight", (v, d))]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        out += [(p + "attention.wq.weight", (d, d)), (p + "attention.wk.weight", (kv, d)),
                (p + "attention.wv.weight", (kv, d)), (p + "attention.wo.weight", (d, d)),
                (p + "feed_forward.w1.weight", (f, d)), (p + "feed_forward.w2.weight", (d, f)),
                (p + "feed_forward.w3.weight", (f, d)), (p + "attention_norm.weight", (d,)),
                (p + "ffn_norm.weight", (d,))]
    return out + [("norm.weight", (d,))] + ([] if cfg.tie_word_embeddings else [("output.weight", (v, d))])


def _suffix(name: str) -> str:
    m = _LAYER.fullmatch(name)
    return m.group(2) if m else name


def meta_split_dim(name: str) -> int | None:
    return META_SPLIT_DIM[_suffix(name)]


def to_hf_name(name: str) -> str:
    m = _LAYER.fullmatch(name)
    return f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}" if m else _HF_TOP[name]


def is_rotary(name: str) -> bool:
    return _suffix(name) in ("attention.wq.weight", "attention.wk.weight")


def permute_to_hf(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Meta's q/k rows (consecutive pairs) → HF's (halves), per head (wk has n_kv_heads of them)."""
    dim_out, dim_in = w.shape
    return w.view(-1, head_dim // 2, 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)


def permute_from_hf(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    dim_out, dim_in = w.shape
    return w.view(-1, 2, head_dim // 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)


def meta_params(cfg: LlamaConfig) -> dict:
    params = {"dim": cfg.dim, "multiple_of": cfg.multiple_of, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
              "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size}
    if cfg.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = cfg.ffn_dim_multiplier
    if cfg.n_kv_heads is not None and cfg.n_kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    if cfg.rope_theta != 10000.0:
        params["rope_theta"] = cfg.rope_theta
    params |= meta_rope_scaling(cfg.rope_scaling)
    if cfg.ffn_dim != ffn_hidden_size(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier):
        raise ValueError(f"ffn_dim={cfg.ffn_dim} cannot be written as Meta's params.json (dim={cfg.dim}, "
                         f"multiple_of={cfg.multiple_of}): Meta's code derives it from dim")
    return params


def meta_rope_scaling(scaling: dict | None) -> dict:
    """params.json's keys for a RoPE scaling. Meta's file says only `use_scaled_rope`, its code
    supplying LLaMA 3.1's values; llama-models also reads `rope_scaling_factor` and
    `high_freq_factor` (LLaMA 3.2's small models use factor 32). Other values have no key."""
    if scaling is None:
        return {}
    fixed = {k: LLAMA3_ROPE_SCALING[k] for k in ("low_freq_factor", "original_max_position_embeddings")}
    if any(scaling[k] != v for k, v in fixed.items()):
        raise ValueError(f"rope_scaling {scaling} cannot be written as Meta's params.json, whose code fixes {fixed}")
    out = {"use_scaled_rope": True}
    for ours, theirs in (("factor", "rope_scaling_factor"), ("high_freq_factor", "high_freq_factor")):
        if scaling[ours] != LLAMA3_ROPE_SCALING[ours]:
            out[theirs] = scaling[ours]
    return out


# LLaMA 3.2's 1B and 3B (dim, n_layers): their params.json says only use_scaled_rope, and Meta's
# code and Hugging Face's converter (by model version) scale by 32 instead of 3.1's 8
LLAMA32_SHAPES = {(2048, 16), (3072, 28)}


def rope_scaling_from_meta(params: dict) -> dict | None:
    if not params.get("use_scaled_rope"):
        return None
    default = 32.0 if (params.get("dim"), params.get("n_layers")) in LLAMA32_SHAPES else LLAMA3_ROPE_SCALING["factor"]
    return LLAMA3_ROPE_SCALING | {"factor": params.get("rope_scaling_factor") or default,
                                  "high_freq_factor": params.get("high_freq_factor")
                                  or LLAMA3_ROPE_SCALING["high_freq_factor"]}


def config_from_meta(params: dict, vocab_from_weights: int, max_seq_len: int = 2048) -> LlamaConfig:
    vocab = params.get("vocab_size", -1)
    return LlamaConfig(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                       n_kv_heads=params.get("n_kv_heads"),
                       vocab_size=vocab if vocab and vocab > 0 else vocab_from_weights,
                       multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                       norm_eps=params.get("norm_eps", 1e-6), rope_theta=params.get("rope_theta", 10000.0),
                       rope_scaling=rope_scaling_from_meta(params), max_seq_len=max_seq_len)


def hf_config(cfg: LlamaConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
            "intermediate_size": cfg.ffn_dim, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "num_hidden_layers": cfg.n_layers, "rms_norm_eps": cfg.norm_eps,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "rope_parameters": (cfg.rope_scaling or {"rope_type": "default"}) | {"rope_theta": cfg.rope_theta},
            "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,  # what transformers 4.x reads
            "hidden_act": "silu", "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def config_from_hf(c: dict) -> LlamaConfig:
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers ≥ 5, and before
    theta = rope.get("rope_theta") or c.get("rope_theta") or 10000.0
    dim, ffn = c["hidden_size"], c["intermediate_size"]
    # the paper's rule with the largest multiple_of that gives this width, else the width as such
    multiple = next((m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1) if ffn_hidden_size(dim, m) == ffn), None)
    return LlamaConfig(dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads, n_kv_heads=None if kv == heads else kv,
                       vocab_size=c["vocab_size"],
                       norm_eps=c.get("rms_norm_eps", 1e-6), max_seq_len=c.get("max_position_embeddings", 2048),
                       rope_theta=float(theta), rope_scaling=rope or None, multiple_of=multiple or 256,
                       tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                       ffn_hidden=None if multiple else ffn)
