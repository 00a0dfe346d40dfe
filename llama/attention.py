"""Rotary position embeddings and causal self-attention (paper section 2.2 and 2.4).

RoPE follows Meta's released code: *consecutive* pairs (x0, x1), (x2, x3), … of each head
rotate by θ_i = theta^(-2i/head_dim), so Meta's weights load without permutation, and it is
computed as Meta's is, as a complex product in fp32.

Attention backends: `sdpa` (torch's scaled_dot_product_attention, causal, never materialises
the masked scores with its flash/efficient kernels), `xformers` (memory_efficient_attention,
CUDA only: its wheel has no CPU kernels) and `auto` (xformers where its kernels run, else sdpa).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from llama.packing import masked_attention
from parallel.layers import NO_TP, ColumnParallelLinear, RowParallelLinear, TensorParallel, column_parallel, divide

BACKENDS = ("auto", "sdpa", "xformers")


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position × θ_i, θ_i = theta^(-2i/head_dim): each [max_seq_len, head_dim/2],
    fp32. `scaling`: LLaMA 3.1's (llama.config.rope_scaling), applied to the θ_i."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        freqs = llama3_scaled(freqs, scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), freqs)
    return angles.cos(), angles.sin()


def llama3_scaled(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """LLaMA 3.1's long-context frequencies (Meta's `apply_scaling`): wavelengths shorter than
    original/high_freq_factor positions are kept, those longer than original/low_freq_factor are
    stretched by `factor`, and those between are interpolated smoothly between the two."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: stretched, 1: kept
    return (1 - smooth) * freqs / factor + smooth * freqs


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [batch, seq, heads, head_dim] by the tables of `rope_tables`
    ([seq, head_dim/2]): (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).

    As Meta's code: the pairs are complex numbers times e^(i·angle), computed in fp32 (bf16 q and
    k are upcast and the result rounded once). One vectorised complex product is also the fastest
    form on a CPU: forward + backward of q of a 4×256×512 batch take 0.47 ms in fp32, where
    x·C + swap(x)·S in real arithmetic took 1.85 ms (the pair swap is a strided copy). The rotation is orthogonal, so
    backward rotates the gradient back, by the conjugate: nothing but the tables is kept for it."""
    return _Rotary.apply(x, cos, sin)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, conjugate=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, conjugate=True), None, None


def _rotate(x, cos, sin, conjugate: bool):
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 (gradcheck)
    pairs = torch.view_as_complex(x.to(compute).contiguous().unflatten(-1, (-1, 2)))
    turn = torch.complex(cos.to(compute), -sin.to(compute) if conjugate else sin.to(compute))
    return torch.view_as_real(pairs * turn.unsqueeze(-2)).flatten(-2).to(x.dtype)  # tables [s, d/2] or [b, s, d/2]


@functools.cache
def xformers_unavailable_reason(device_type: str) -> str | None:
    """None when xformers' memory-efficient attention runs on `device_type`, else why not."""
    if device_type != "cuda":
        return f"xformers has no kernels for device '{device_type}' (its wheels are CUDA builds)"
    try:
        import xformers.ops as xops
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q, attn_bias=xops.LowerTriangularMask())
    except Exception as err:  # an import error, or a wheel built for another CUDA/torch
        return f"xformers cannot run: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def resolve_backend(name: str, device) -> str:
    """The backend that will run: 'sdpa' or 'xformers'. Fails clearly for one that cannot."""
    if name not in BACKENDS:
        raise ValueError(f"attention={name!r} is not a backend; choose one of {BACKENDS}")
    device_type = torch.device(device).type if device is not None else "cpu"
    if name == "sdpa" or device_type == "meta":
        return "sdpa"
    reason = xformers_unavailable_reason(device_type)
    if name == "xformers" and reason:
        raise ValueError(f"attention='xformers' cannot run here: {reason}; use 'sdpa' or 'auto'")
    return "sdpa" if reason else "xformers"


def causal_attention(q, k, v, backend: str = "sdpa", start_pos: int = 0, mask=None):
    """q [b, s_q, h, d]; k, v [b, s_k, h, d]; query i sits at position start_pos + i. `mask`:
    packed examples' block-diagonal causal mask (llama/packing.py) in the backend's form."""
    if mask is not None:
        return masked_attention(q, k, v, mask)
    s_q, s_k = q.shape[1], k.shape[1]
    if backend == "xformers":
        import xformers.ops as xops
        bias = xops.LowerTriangularFromBottomRightMask() if s_q > 1 else None
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if start_pos == 0 and s_q == s_k:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif s_q == 1:  # one new token sees the whole cache
        out = F.scaled_dot_product_attention(q, k, v)
    else:  # a chunk after a cache: causal with an offset
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head causal self-attention; heads are split across tp (wq, wk, wv by rows, wo by
    columns). With grouped-query attention (`n_kv_heads` < n_heads, LLaMA 2 70B and LLaMA 3) wk
    and wv have n_kv_heads heads, each serving n_heads / n_kv_heads consecutive query heads.
    tp ≤ n_kv_heads splits them too (tp must divide n_kv_heads); tp > n_kv_heads (a multiple of
    it) gives each tp rank a copy of the one kv head its query heads use, tp / n_kv_heads
    consecutive ranks sharing it, their gradients summed. Either way each rank's query heads
    find their kv heads on the same rank, and the KV cache holds only those."""

    def __init__(self, dim: int, n_heads: int, n_layers: int, tp: TensorParallel = NO_TP,
                 backend: str = "sdpa", device=None, dtype=None, n_kv_heads: int | None = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        self.n_local_heads = divide(n_heads, tp.size, "n_heads")
        replicas = divide(tp.size, n_kv_heads, "tp") if tp.size > n_kv_heads else 1
        self.n_local_kv_heads = divide(n_kv_heads * replicas, tp.size, "n_kv_heads")
        self.head_dim = dim // n_heads
        self.backend = backend
        kw = dict(tp=tp, device=device, dtype=dtype)
        self.wq = ColumnParallelLinear(dim, dim, **kw)
        self.wk = ColumnParallelLinear(dim, n_kv_heads * self.head_dim, replicas=replicas, **kw)
        self.wv = ColumnParallelLinear(dim, n_kv_heads * self.head_dim, replicas=replicas, **kw)
        # Residual-branch outputs scaled by 1/sqrt(2·n_layers) (GPT-2, Megatron-LM).
        self.wo = RowParallelLinear(dim, dim, init_std=0.02 / math.sqrt(2 * n_layers), **kw)

    def forward(self, x, cos, sin, kv_cache=None, start_pos: int = 0, mask=None):
        xq, xk, xv = column_parallel(x, self.wq, self.wk, self.wv)
        b, s = xq.shape[:2]  # the full sequence, also when x was a sequence shard
        xq = xq.view(b, s, self.n_local_heads, self.head_dim)
        xk, xv = (t.view(b, s, self.n_local_kv_heads, self.head_dim) for t in (xk, xv))
        xq, xk = apply_rope(xq, cos, sin), apply_rope(xk, cos, sin)
        if kv_cache is not None:
            xk, xv = kv_cache.update(xk, xv, start_pos)
        group = self.n_local_heads // self.n_local_kv_heads
        if group > 1:  # query head h uses kv head h // group
            xk, xv = xk.repeat_interleave(group, dim=2), xv.repeat_interleave(group, dim=2)
        out = causal_attention(xq, xk, xv, self.backend, start_pos, mask)
        return self.wo(out.reshape(b, s, -1))
