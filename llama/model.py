"""The LLaMA transformer (Touvron et al. 2023, section 2.2), built only from `parallel` layers.

    tokens → embedding → n × [RMSNorm → attention(RoPE) → +residual; RMSNorm → SwiGLU → +residual]
           → RMSNorm → output projection

Pre-normalisation, SwiGLU, rotary embeddings, no biases, untied input and output embeddings
(tied in LLaMA 3.2's small models: `tie_word_embeddings`, the head multiplying by the embedding).
Parameter names are Meta's and layout-free (`layers.17.attention.wq.weight`). On one process
the parallel layers are plain linear layers; with a tp group they shard themselves. A pipeline
stage builds only its `layer_ids`, plus the embedding on the first stage and the head on the last.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama.attention import Attention, resolve_backend, rope_tables
from llama.config import LlamaConfig
from parallel.layers import (
    NO_TP,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    column_parallel,
    padded_size,
)
from parallel.loss import vocab_parallel_cross_entropy
from parallel.mappings import gather_from_tp
from parallel.norm import RMSNorm
from parallel.recompute import check_mode, run_with_recompute
from parallel.topology import divisors


def check_tensor_parallel(cfg: LlamaConfig, tp: int, sp: bool = False, seq_len: int | None = None,
                          ranks: int | None = None) -> None:
    """Fail with one line, before any collective, when the model cannot be split over tp ranks.
    `ranks`: the processes tp can spread over (world / pp), when known: the tp values suggested
    divide it too."""
    for name, value in (("n_heads", cfg.n_heads), ("ffn_dim", cfg.ffn_dim)):
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tp={tp}; choose tp in {_tp_choices(value, ranks)}")
    if cfg.kv_heads % tp and tp % cfg.kv_heads:
        choices = _tp_choices(cfg.n_heads, ranks, cfg.kv_heads)
        raise ValueError(f"tp={tp} neither divides n_kv_heads={cfg.kv_heads} nor is a multiple of it: a tp rank holds "
                         f"whole kv heads, or a copy of one; choose tp in {choices}")
    if sp and seq_len is not None and seq_len % tp:
        raise ValueError(f"seq_len={seq_len} is not divisible by tp={tp}: sequence parallelism shards the "
                         f"sequence over the tp ranks; pad the sequence or turn sp off")


def _tp_choices(n: int, ranks: int | None, kv_heads: int | None = None) -> str:
    """The tp values that divide n (and the processes, when known; and that divide or are a
    multiple of kv_heads, when given)."""
    fits = [d for d in divisors(n, ranks or 64) if kv_heads is None or kv_heads % d == 0 or d % kv_heads == 0]
    if ranks is None:
        return str(fits)
    return f"{[d for d in fits if ranks % d == 0]} (those that also divide the {ranks} processes)"


class _SwiGLU(torch.autograd.Function):
    """silu(a) · b in one new tensor; backward recomputes silu(a) rather than keeping it (the
    same operations as autograd on `F.silu(a) * b`, one activation fewer kept).

    `grad_is_private`: the incoming gradient is the caller's own temporary (in FeedForward it is
    w2's fresh input gradient) and becomes grad_a in place: one [tokens, hidden] allocation less."""

    @staticmethod
    def forward(ctx, a, b, grad_is_private=False):
        ctx.save_for_backward(a, b)
        ctx.grad_is_private = grad_is_private
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_b = F.silu(a).mul_(grad) if ctx.needs_input_grad[1] else None
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = grad.mul_(b) if ctx.grad_is_private else grad * b
            torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)  # silu' in place
        return grad_a, grad_b, None


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int, n_layers: int, tp: TensorParallel = NO_TP, device=None, dtype=None):
        super().__init__()
        kw = dict(tp=tp, device=device, dtype=dtype)
        self.w1 = ColumnParallelLinear(dim, hidden, **kw)
        self.w3 = ColumnParallelLinear(dim, hidden, **kw)
        self.w2 = RowParallelLinear(hidden, dim, init_std=0.02 / math.sqrt(2 * n_layers), **kw)

    def forward(self, x):
        h1, h3 = column_parallel(x, self.w1, self.w3)
        return self.w2(_SwiGLU.apply(h1, h3, True))  # w2's input gradient is private


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TensorParallel = NO_TP, backend="sdpa", device=None, dtype=None):
        super().__init__()
        kw = dict(tp=tp, device=device, dtype=dtype)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_layers, backend=backend, n_kv_heads=cfg.kv_heads, **kw)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, cfg.n_layers, **kw)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, **kw)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, **kw)

    def forward(self, x, cos, sin, kv_cache=None, start_pos: int = 0, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The whole model, or one pipeline stage of it.

    tp: the tensor-parallel group and whether sequence parallelism is on.
    attention: 'auto' | 'sdpa' | 'xformers'.  recompute: 'none' | 'selective' | 'full'.
    vocab_pad_multiple: the vocabulary is padded to a multiple of this × tp (padding never wins
    a softmax nor receives a loss). layer_ids / first_stage / last_stage: a pipeline stage.
    """

    def __init__(self, cfg: LlamaConfig, tp: TensorParallel = NO_TP, attention: str = "auto",
                 recompute: str = "none", vocab_pad_multiple: int = 1, layer_ids=None,
                 first_stage: bool = True, last_stage: bool = True, device=None, dtype=None):
        super().__init__()
        check_tensor_parallel(cfg, tp.size)
        self.cfg, self.tp, self.recompute = cfg, tp, check_mode(recompute)
        self.first_stage, self.last_stage = first_stage, last_stage
        self.backend = resolve_backend(attention, device)
        kw = dict(tp=tp, device=device, dtype=dtype)
        layer_ids = range(cfg.n_layers) if layer_ids is None else layer_ids
        if first_stage:
            self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, pad_to_multiple_of=vocab_pad_multiple,
                                                         **kw)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, backend=self.backend, **kw) for i in layer_ids})
        if last_stage:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps, **kw)
            self.padded_vocab = padded_size(cfg.vocab_size, vocab_pad_multiple * tp.size)
            self.output = ColumnParallelLinear(cfg.dim, cfg.vocab_size, padded_out_features=self.padded_vocab, **kw)
            if cfg.tie_word_embeddings:  # one weight, [vocab/tp, dim] on both sides, padded alike
                if first_stage:
                    self.output.weight = self.tok_embeddings.weight
                else:  # a copy, kept equal: see llama.parallelize.tie_embeddings
                    self.output.weight.tied_name, self.output.weight.tied_copy = "tok_embeddings.weight", True
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x, targets=None, start_pos: int = 0, kv_caches=None, packing=None):
        """x: token ids [b, s] on the first stage, else the hidden state from the previous stage.

        Returns the hidden state on a stage that is not last; on the last, the mean loss when
        `targets` is given, else this rank's logits [b, s, vocab/tp] (see `gather_logits`).
        `packing` (llama/packing.py): rows of packed examples, each token at its own position in
        its example and attending within it only; the loss is then summed over the unmasked
        targets and divided by `packing.loss_tokens` (when set).
        """
        if self.first_stage:
            check_tensor_parallel(self.cfg, self.tp.size, self.tp.sp, x.shape[1])
        h = self.tok_embeddings(x) if self.first_stage else x
        seq = x.shape[1] if self.first_stage else h.shape[1] * (self.tp.size if self.tp.sp else 1)
        if start_pos + seq > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + seq} exceed max_seq_len={self.cfg.max_seq_len}")
        if packing is None:
            cos = self.rope_cos[start_pos:start_pos + seq]
            sin = self.rope_sin[start_pos:start_pos + seq]
        else:  # every token its position within its example: tables [b, s, head_dim/2]
            cos, sin = self.rope_cos[packing.positions], self.rope_sin[packing.positions]
            mask = packing.attention_mask(self.backend)
        for name, layer in self.layers.items():
            if kv_caches is not None:
                h = layer(h, cos, sin, kv_caches[name], start_pos)
            elif packing is not None:
                h = run_with_recompute(layer, h, cos, sin, None, 0, mask, mode=self.recompute)
            else:
                h = run_with_recompute(layer, h, cos, sin, mode=self.recompute)
        if not self.last_stage:
            return h
        logits = self.output(self.norm(h))
        if targets is None:
            return logits
        if packing is not None and packing.loss_tokens is not None:  # a share of the global batch's mean
            return vocab_parallel_cross_entropy(logits, targets, self.tp.group, self.vocab_start, self.cfg.vocab_size,
                                                reduction="sum", inplace_backward=True) / packing.loss_tokens
        return vocab_parallel_cross_entropy(logits, targets, self.tp.group, self.vocab_start, self.cfg.vocab_size,
                                            inplace_backward=True)  # nobody else holds these logits

    @property
    def vocab_start(self) -> int:
        return self.tp.rank * (self.padded_vocab // self.tp.size)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, s, vocab_size] from this rank's slice (one all-gather)."""
        return gather_from_tp(logits, self.tp.group)[..., : self.cfg.vocab_size]
