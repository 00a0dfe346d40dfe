"""Packed examples in one sequence: per-token positions and segments, and the attention that
never crosses from one example to another (instruction fine-tuning, llama/sft.py).

A packed row holds several whole examples back to back, then padding. `Packing` carries, for
the model's input tokens [b, s]:

    positions  each token's position within its own example (0 at the example's first token):
               RoPE rotates by these, so an example sees the same rotations as when run alone
    segments   which example of its row each token belongs to (padding is a segment of its own):
               a query attends to the keys of its own segment at or before it, a block-diagonal
               causal mask
    loss_tokens  what the summed loss of the micro-batch is divided by (None: the mean over its
               unmasked targets); the trainer sets it so the step's loss is the mean over every
               unmasked target of the global batch (llama/sft.py, `packed_micro_batches`)

Backends: `sdpa` gets a boolean mask [b, 1, s, s] (causal & same segment: every query sees at
least itself, so no row is empty); `xformers` gets `BlockDiagonalCausalMask` over the batch
flattened to one sequence of b·s tokens (one block per segment of each row). Under sequence
parallelism attention sees the whole sequence (the column layers gather it), so positions and
segments are those of the full sequence and are never sharded; under pipeline parallelism every
stage receives them with the micro-batch, as the last stage receives the targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Packing:
    positions: torch.Tensor          # [b, s] int64
    segments: torch.Tensor           # [b, s] int64
    loss_tokens: float | None = None
    _masks: dict = field(default_factory=dict, repr=False, compare=False)  # by backend, built once

    def attention_mask(self, backend: str):
        """The block-diagonal causal mask in `backend`'s form (see the module docstring), built
        once per micro-batch: every model chunk of the rank (vpp > 1) and recompute reuse it."""
        if backend not in self._masks:
            if backend == "xformers":
                from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask
                self._masks[backend] = BlockDiagonalCausalMask.from_seqlens(segment_lengths(self.segments))
            else:
                self._masks[backend] = block_causal_mask(self.segments)
        return self._masks[backend]


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query i may attend to key j: j <= i, same segment."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def segment_lengths(segments: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal segment ids, row after row (a run never spans two rows)."""
    b, s = segments.shape
    rows = torch.arange(b, device=segments.device)[:, None]
    key = rows * (int(segments.max()) + 1) + segments  # distinct across rows
    return torch.unique_consecutive(key.flatten(), return_counts=True)[1].tolist()


def masked_attention(q, k, v, mask):
    """q, k, v [b, s, h, d] with a mask from `Packing.attention_mask`: a boolean tensor (sdpa)
    or an xformers attention bias (the batch flattened to one sequence)."""
    if isinstance(mask, torch.Tensor):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    import xformers.ops as xops
    b, s = q.shape[:2]
    q, k, v = (t.reshape(1, b * s, *t.shape[2:]) for t in (q, k, v))
    return xops.memory_efficient_attention(q, k, v, attn_bias=mask).reshape(b, s, *q.shape[2:])
