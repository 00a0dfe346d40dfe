"""`python -m llama.train` / `llama-train`: train a LLaMA from a preset or YAML config.

    python -m llama.train --config configs/tiny.yaml
    python -m llama.train --config llama-7b --set train.steps=10 --set model.n_layers=2
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import yaml
from tqdm import tqdm

from llama.config import ConfigError, RunConfig, load_config
from llama.demo_corpus import prose_text
from llama.model import Transformer
from parallel.lr_schedule import lr_at
from parallel.params import init_parameters

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_overrides(items: list[str]) -> dict:
    """`section.key=value` pairs (value parsed as YAML) → {"section": {"key": value}}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train"):
            raise ConfigError(f"--set {item!r} must look like model.KEY=VALUE or train.KEY=VALUE")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def byte_batches(text: str, seq_len: int, batch: int, seed: int):
    """Random windows of seq_len + 1 bytes of `text`: (inputs, targets) pairs, forever."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    if len(data) <= seq_len + 1:
        raise ValueError(f"the corpus has {len(data)} tokens, fewer than seq_len+1={seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def decay_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on matrices (linear and embedding weights), none on norm weights: the usual
    choice of Megatron-LM and GPT-NeoX, since decaying a gain pulls it towards zero, not towards 1."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(run: RunConfig, show_progress: bool = True) -> list[float]:
    """Train on one process; returns the loss of every step."""
    m, t = run.model, run.train
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 256 for the byte-level demo corpus")
    torch.manual_seed(t.seed)
    model = Transformer(m, attention=t.attention, recompute=t.recompute, dtype=DTYPES[t.dtype])
    init_parameters(model, t.seed)
    optimizer = torch.optim.AdamW(decay_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  fused=True)
    batches = byte_batches(prose_text(max_bytes=600_000), t.seq_len, t.micro_batch, t.seed)
    accumulation = t.global_batch // t.micro_batch
    losses: list[float] = []
    bar = tqdm(range(t.steps), desc="train", disable=not show_progress, dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(accumulation):
            inputs, targets = next(batches)
            loss = model(inputs, targets) / accumulation
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {step}")
        tokens_per_s = (step + 1) * t.global_batch * t.seq_len / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}", tok_s=f"{tokens_per_s:,.0f}")
        if not show_progress and (step % t.log_every == 0 or step == t.steps - 1):
            print(f"step {step} loss {total:.4f} lr {lr:.2e} tokens/s {tokens_per_s:,.0f}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="a preset name (configs/*.yaml) or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.steps=50 (repeatable)")
    parser.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
    parser.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set + ([f"train.steps={args.steps}"] if args.steps else []))
        run = load_config(args.config, overrides)
        losses = train(run, show_progress=not args.no_progress)
    except ConfigError as err:
        print(f"llama-train: error: {err}", file=sys.stderr)
        return 2
    print(f"loss: first step {losses[0]:.3f}, last step {losses[-1]:.3f} "
          f"(mean of last 10: {sum(losses[-10:]) / len(losses[-10:]):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
