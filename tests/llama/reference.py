"""An independent LLaMA forward pass in plain PyTorch, the reference our model is tested against.

Written from the LLaMA paper (Touvron et al. 2023, section 2.2) and Meta's released `model.py`:
RMSNorm pre-normalisation, rotary embeddings applied with complex numbers (`precompute_freqs_cis`,
`view_as_complex` on consecutive pairs), an explicit causal attention matrix, SwiGLU, untied
output projection. It deliberately imports nothing from `llama` or `parallel`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Meta's: e^{i·t·θ_k}, θ_k = theta^(-2k/dim), for positions t < end; [end, dim/2] complex."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].double() / dim))
    t = torch.arange(end, dtype=torch.float64)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [b, s, h, d]: consecutive pairs (x0, x1), (x2, x3), ... are complex numbers, rotated by freqs_cis [s, d/2]."""
    x_ = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    freqs_cis = freqs_cis.view(1, x_.shape[1], 1, x_.shape[-1])
    return torch.view_as_real(x_ * freqs_cis).flatten(3)


def attention(x, wq, wk, wv, wo, n_heads: int, freqs_cis: torch.Tensor) -> torch.Tensor:
    b, s, dim = x.shape
    head_dim = dim // n_heads
    q = (x @ wq.T).view(b, s, n_heads, head_dim)
    k = (x @ wk.T).view(b, s, n_heads, head_dim)
    v = (x @ wv.T).view(b, s, n_heads, head_dim)
    q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
    scores = q @ k.transpose(2, 3) / math.sqrt(head_dim)
    mask = torch.full((s, s), float("-inf"), dtype=scores.dtype).triu(1)
    probs = torch.softmax(scores + mask, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, s, dim)
    return out @ wo.T


def feed_forward(x, w1, w2, w3) -> torch.Tensor:
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def reference_logits(state_dict: dict, cfg, tokens: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits [b, s, vocab_size] of the LLaMA with Meta-named weights `state_dict`, computed in `dtype`.

    cfg needs dim, n_heads, n_layers, vocab_size, norm_eps and rope_theta. Weight rows beyond
    vocab_size (vocabulary padding) are ignored.
    """
    w = {k: v.detach().to("cpu", dtype) for k, v in state_dict.items()}
    seq = tokens.shape[1]
    freqs_cis = precompute_freqs_cis(cfg.dim // cfg.n_heads, seq, cfg.rope_theta)
    h = w["tok_embeddings.weight"][: cfg.vocab_size][tokens]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"], cfg.norm_eps)
        h = h + attention(x, *(w[p + f"attention.{n}.weight"] for n in ("wq", "wk", "wv", "wo")), cfg.n_heads,
                          freqs_cis)
        x = rms_norm(h, w[p + "ffn_norm.weight"], cfg.norm_eps)
        h = h + feed_forward(x, *(w[p + f"feed_forward.{n}.weight"] for n in ("w1", "w2", "w3")))
    return rms_norm(h, w["norm.weight"], cfg.norm_eps) @ w["output.weight"][: cfg.vocab_size].T
