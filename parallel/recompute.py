"""Activation checkpointing: `none`, `selective` (the paper's) and `full`.

Selective follows section 2.4 of the LLaMA paper: keep the expensive activations, the outputs
of the matrix multiplications (and of the fused attention kernel, whose recomputation would cost
a second quadratic pass), and recompute the cheap element-wise ones (norms, RoPE, SiLU, products)
in backward. The paper did it with a hand-written backward; torch's selective checkpointing gives
the same trade with autograd. `full` keeps only each layer's input and recomputes the layer.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


# xformers' and flash-attn's forward kernels, by name (they are custom ops, not aten)
SAVED_OP_NAMES = ("efficient_attention_forward", "flash_fwd", "flash_attn_forward", "fmha")


def _save_matmuls(ctx, op, *args, **kwargs):
    if op in SAVED_OPS or any(name in str(op) for name in SAVED_OP_NAMES):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"recompute={mode!r} is not a mode; choose one of {MODES}")
    return mode


def run_with_recompute(fn, *args, mode: str = "none"):
    """Call fn(*args), keeping for backward what `mode` says."""
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    context = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context)
