"""Datasets: documents packed into windows, a weighted mixture of sources, and a global sample
order that every layout reads the same way.

Packing: a shard's token stream (documents with EOS between them) is cut into windows of
seq_len + 1 tokens that overlap by one (inputs and shifted targets); window k starts at token
k·seq_len. Each source's windows are visited in a fresh seeded permutation every epoch, computed
index by index (`SeededPermutation`), so no rank holds an epoch-sized array.

Mixture (the paper's Table 1): the global sample stream is cut into blocks of 1000; in every
block source s gets round(w_s · 1000) slots (largest remainders), placed by a permutation seeded
with (seed, block). Shares are exact to within one block, yet interleaved at random.

Fine-tuning shards (with a loss mask, llama/sft.py) are read as whole examples instead:
`PackedExamples` packs them into rows (see there), and a sample is then a [4, seq_len + 1]
array of tokens, loss mask, positions and segments. A mixture is all of one kind.

Global order: global batch b is samples [consumed, consumed + global_batch) of that stream; dp
rank d reads its contiguous slice. The only state is the number of consumed samples, so a run
resumed with another dp size continues the same stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llama.shards import Shard, ShardError

BLOCK = 1000


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SeededPermutation:
    """A pseudo-random permutation of range(n), computed one index at a time: a 4-round Feistel
    network on the next even power of two, cycle-walking back into range. No n-element array,
    so a source of 10⁹ windows costs nothing per rank (a materialised order would cost 8 GB)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.half = (max(2, (n - 1).bit_length()) + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_splitmix64((seed & _MASK64) * 4 + r) for r in range(4)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside range({self.n})")
        x = i
        while True:  # at most 4 rounds of walking on average: the domain is < 4n
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ (_splitmix64(right ^ key) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class PackedDataset:
    """Windows of seq_len + 1 tokens over one shard, reshuffled every epoch."""

    def __init__(self, shard: Shard, seq_len: int, seed: int, name: str = ""):
        self.shard, self.seq_len, self.seed, self.name = shard, seq_len, seed, name or str(shard.prefix)
        self.n_windows = (shard.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ShardError(f"shard {str(shard.prefix)!r} has {shard.n_tokens} tokens, too few for one window of "
                             f"seq_len+1={seq_len + 1}")

    @property
    def n_tokens(self) -> int:
        return self.shard.n_tokens

    def window(self, j: int) -> np.ndarray:
        """The j-th window this source serves (j counts across epochs)."""
        epoch, k = divmod(j, self.n_windows)
        start = SeededPermutation(self.n_windows, self.seed * 1_000_003 + epoch)(k) * self.seq_len
        return np.asarray(self.shard.tokens[start:start + self.seq_len + 1], dtype=np.int64)


class PackedExamples:
    """A fine-tuning shard's examples packed whole into rows of seq_len + 1 tokens.

    Packing: the examples, in an order seeded by `seed`, fill rows greedily: each goes into the
    current row if it fits, else starts the next one; the rest of a row is padding (token 0,
    loss mask 0, a segment of its own). A row of seq_len + 1 tokens gives seq_len inputs and
    their next-token targets; an example's last token is only a target, so one of n tokens
    fits in a row whenever n <= seq_len + 1. Longer examples are truncated to seq_len + 1
    tokens (their tail, usually the end of the response, is not trained; `truncated` counts
    them). The packing is made once; every epoch visits the rows in a new seeded order, as
    `PackedDataset` visits its windows.

    window(j) -> int64 [4, seq_len + 1]: tokens, loss mask (1: a trained target), position of
    each token within its example (0 at its first token, BOS), segment (the example's index in
    the row; padding after the last example)."""

    def __init__(self, shard: Shard, seq_len: int, seed: int, name: str = ""):
        if shard.loss_mask is None:
            raise ShardError(f"shard {str(shard.prefix)!r} has no loss mask ({shard.prefix}.mask): not a fine-tuning "
                             "shard (tools/preprocess_data.py --format sft writes one)")
        self.shard, self.seq_len, self.seed, self.name = shard, seq_len, seed, name or str(shard.prefix)
        offsets = shard.offsets.astype(np.int64)
        lengths = np.diff(offsets)
        self.truncated = int((lengths > seq_len + 1).sum())
        self.starts, self.lengths = offsets[:-1], np.minimum(lengths, seq_len + 1)
        self.order = np.random.default_rng([seed, 1]).permutation(shard.n_docs)
        row_starts, used = [0], 0
        for i, n in enumerate(self.lengths[self.order].tolist()):
            if used + n > seq_len + 1:
                row_starts.append(i)
                used = 0
            used += n
        row_starts.append(shard.n_docs)
        self.row_starts = np.asarray(row_starts, dtype=np.int64)
        self.n_windows = len(self.row_starts) - 1
        if shard.n_docs == 0:
            raise ShardError(f"fine-tuning shard {str(shard.prefix)!r} has no examples")

    @property
    def n_tokens(self) -> int:
        return self.shard.n_tokens

    def row(self, r: int) -> np.ndarray:
        """Packed row r (in packing order): [4, seq_len + 1]."""
        out = np.zeros((4, self.seq_len + 1), dtype=np.int64)
        at = 0
        docs = self.order[self.row_starts[r]:self.row_starts[r + 1]]
        for seg, d in enumerate(docs.tolist()):
            start, n = int(self.starts[d]), int(self.lengths[d])
            out[0, at:at + n] = self.shard.tokens[start:start + n]
            out[1, at:at + n] = self.shard.loss_mask[start:start + n]
            out[2, at:at + n] = np.arange(n)
            out[3, at:at + n] = seg
            at += n
        out[2, at:] = np.arange(self.seq_len + 1 - at)
        out[3, at:] = len(docs)  # padding: a segment of its own, never a target
        return out

    def window(self, j: int) -> np.ndarray:
        """The j-th row this source serves (j counts across epochs)."""
        epoch, k = divmod(j, self.n_windows)
        return self.row(SeededPermutation(self.n_windows, self.seed * 1_000_003 + epoch)(k))


def block_counts(weights: list[float], block: int = BLOCK) -> list[int]:
    """Slots per source in a block: proportional to the weights, summing to `block`."""
    total = sum(weights)
    exact = [w / total * block for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: block - sum(counts)]:
        counts[i] += 1
    return counts


class Mixture:
    """A weighted mixture of sources, addressed by global sample index."""

    def __init__(self, sources: list[PackedDataset], weights: list[float], seed: int):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        if min(weights) <= 0:
            raise ValueError(f"mixture weights {weights} must be positive")
        total = sum(weights)
        self.sources, self.weights, self.seed = sources, [w / total for w in weights], seed
        self.counts = block_counts(self.weights)
        self._blocks: dict = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, index within that source's stream) for block b."""
        if b in self._blocks:
            return self._blocks[b]
        slots = np.repeat(np.arange(len(self.sources)), self.counts)
        slots = np.random.default_rng([self.seed, 7919, b]).permutation(slots)
        within = np.zeros(BLOCK, dtype=np.int64)
        for s, count in enumerate(self.counts):
            mine = slots == s
            within[mine] = b * count + np.arange(count)
        self._blocks = {b: (slots, within)}  # batches read blocks in order: one is enough
        return slots, within

    def source_of(self, i: int) -> int:
        return int(self._block(i // BLOCK)[0][i % BLOCK])

    def sample(self, i: int) -> np.ndarray:
        slots, within = self._block(i // BLOCK)
        return self.sources[slots[i % BLOCK]].window(int(within[i % BLOCK]))

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Samples [start, start + count) of the global stream, as a [count, seq_len + 1] tensor."""
        return torch.from_numpy(np.stack([self.sample(i) for i in range(start, start + count)]))

    def epochs(self, train_tokens: float) -> list[dict]:
        """Per source: share, tokens it holds, and the epochs it is seen for `train_tokens`
        (Table 1 of the paper: sampling proportion × training tokens ÷ source size)."""
        return [{"source": s.name, "weight": w, "tokens": s.n_tokens, "epochs": w * train_tokens / s.n_tokens}
                for s, w in zip(self.sources, self.weights)]


def rank_slice(data, consumed: int, global_batch: int, dp: int, dp_rank: int) -> torch.Tensor:
    """dp rank `dp_rank`'s contiguous share of the global batch that starts at sample `consumed`."""
    per_rank = global_batch // dp
    return data.samples(consumed + dp_rank * per_rank, per_rank)


def epoch_report(mixture: Mixture, train_tokens: float) -> str:
    lines = [f"{'source':<40} {'weight':>7} {'tokens':>14} {'epochs':>8}"]
    for r in mixture.epochs(train_tokens):
        lines.append(f"{r['source'][-40:]:<40} {r['weight']:>7.3f} {r['tokens']:>14,} {r['epochs']:>8.2f}")
    return "\n".join(lines)


@dataclass
class DataSource:
    path: str
    weight: float = 1.0


def load_mixture(sources: list[dict], seq_len: int, seed: int, vocab_size: int) -> Mixture:
    """Open every shard (clear errors for a missing, truncated or out-of-vocabulary one)."""
    datasets, weights = [], []
    for i, spec in enumerate(sources):
        src = DataSource(**spec)
        shard = Shard(src.path)
        shard.check_vocab(vocab_size)
        kind = PackedExamples if shard.loss_mask is not None else PackedDataset
        datasets.append(kind(shard, seq_len, seed * 1_000_003 + i, name=src.path))
        weights.append(src.weight)
    kinds = {type(d) for d in datasets}
    if len(kinds) > 1:
        tuned = [d.name for d in datasets if isinstance(d, PackedExamples)]
        raise ShardError(f"the data sources mix fine-tuning shards (with a loss mask: {tuned}) and text shards; "
                         "train on one kind at a time")
    return Mixture(datasets, weights, seed)
