"""Text generation with a KV cache: greedy, temperature and top-p sampling, a batch of prompts
of different lengths, stopping at EOS or a token limit. Runs at any tp (pp = 1: a pipeline
would leave all but one stage idle while decoding one token at a time).

    llama-generate --checkpoint runs/demo/ckpt --tokenizer data/demo/tokenizer.model \\
        --prompt "Return the" --prompt "def __init__(self" --max-new-tokens 40 --temperature 0.8 --top-p 0.9
    torchrun --nproc-per-node 2 -m llama.generate ... --tp 2
"""
from __future__ import annotations

import argparse
import sys

import torch

from llama.config import LlamaConfig
from llama.model import Transformer
from parallel.checkpoint import CheckpointError, load_checkpoint, read_meta
from parallel.layers import NO_TP, TensorParallel
from parallel.params import shard_of


class KVCache:
    """Keys and values of every position so far, for one layer: [batch, max_len, local heads, head_dim]."""

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, max_len, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, xk, xv, start_pos: int):
        end = start_pos + xk.shape[1]
        self.k[:, start_pos:end] = xk
        self.v[:, start_pos:end] = xv
        return self.k[:, :end], self.v[:, :end]


def new_caches(model: Transformer, batch: int, max_len: int) -> dict:
    any_layer = next(iter(model.layers.values())).attention
    dtype, device = model.output.weight.dtype, model.output.weight.device
    return {name: KVCache(batch, max_len, any_layer.n_local_heads, any_layer.head_dim, dtype, device)
            for name in model.layers}


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [batch, vocab] → token ids [batch]. temperature 0: greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(dim=-1, keepdim=True), 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each, EOS excluded.

    All sequences share absolute positions from 0 (as Meta's code): decoding starts after the
    shortest prompt, and a longer prompt's own tokens overwrite the samples until it ends.
    Without `use_cache` every step recomputes the whole prefix (the reference for the cache)."""
    if model.tp.sp:
        raise ValueError("generation runs without sequence parallelism (one new token cannot be split over tp)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    batch, shortest = len(prompts), min(len(p) for p in prompts)
    total = min(model.cfg.max_seq_len, max(len(p) for p in prompts) + max_new_tokens)
    device = model.output.weight.device
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    is_prompt = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p[:total])
        is_prompt[i, :len(p)] = True
    caches = new_caches(model, batch, total) if use_cache else None
    generator = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    prev = 0
    for pos in range(shortest, total):
        if use_cache:
            logits = model(tokens[:, prev:pos], start_pos=prev, kv_caches=caches)
        else:
            logits = model(tokens[:, :pos])
        nxt = sample_next(model.gather_logits(logits)[:, -1], temperature, top_p, generator)
        nxt = torch.where(is_prompt[:, pos], tokens[:, pos], nxt)
        tokens[:, pos] = nxt
        if eos_id is not None:
            done |= ~is_prompt[:, pos] & (nxt == eos_id)
        prev = pos
        if done.all():
            break
    out = []
    for i, p in enumerate(prompts):
        new = tokens[i, len(p):prev + 1].tolist()
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id)]
        out.append(new[:max_new_tokens])
    return out


def load_model(checkpoint: str, fmt: str = "native", tp: TensorParallel = NO_TP, dtype=torch.float32,
               device=None, max_seq_len: int | None = None) -> Transformer:
    """A model from a checkpoint of any format, on the GPU when there is one. Meta's and HF's are
    read through the converter's readers, one logical tensor at a time, each rank keeping its
    shard: nothing is written to disk."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    reader = None
    if fmt == "native":
        cfg = LlamaConfig(**read_meta(checkpoint)["config"]["model"])
    else:
        from llama.convert import open_reader
        reader = open_reader(fmt, checkpoint, max_seq_len or 2048)
        cfg = reader.cfg
    if max_seq_len:
        cfg.max_seq_len = max_seq_len
    model = Transformer(cfg, tp=tp, attention="auto", device=device, dtype=dtype).eval()
    if reader is None:
        load_checkpoint(checkpoint, [model], None, None, weights_only=True)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(shard_of(reader.tensor(name, p.logical_shape), p).to(p.dtype))
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (or a root with `latest`)")
    parser.add_argument("--format", default="native", choices=["native", "meta", "hf"])
    parser.add_argument("--tokenizer", required=True, help="SentencePiece model")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable: a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    from launcher.init import initialize
    from llama.tokenizer import Tokenizer, TokenizerError
    try:
        topo = initialize(tp=args.tp)
        if topo.pp > 1:
            raise ValueError("generation runs at pp=1")
        tokenizer = Tokenizer(args.tokenizer)
        model = load_model(args.checkpoint, args.format, TensorParallel(topo.tp_group),
                           torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        tokenizer.check_fits(model.cfg.vocab_size)
    except (CheckpointError, TokenizerError, ValueError) as err:
        print(f"llama-generate: error: {err}", file=sys.stderr)
        return 2
    prompts = [tokenizer.encode(p, bos=True) for p in args.prompt]
    outs = generate(model, prompts, args.max_new_tokens, tokenizer.eos_id, args.temperature, args.top_p, args.seed)
    if topo.rank == 0:
        for prompt, new in zip(prompts, outs):  # decoded together: the space before a new word is kept
            print(f"{tokenizer.decode(prompt + new)}\n{'-' * 40}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
