"""`python -m llama.train` / `llama-train`: train LLaMA on any (tp, pp, dp) layout.

    python -m llama.train --config configs/tiny.yaml                                   # one process
    torchrun --standalone --nproc-per-node 4 -m llama.train --config tiny --tp 2 --pp 2 # 4 local processes
    srun python -m llama.train --config llama-65b --tp 8 --pp 4                         # SLURM (or mpirun)
    python -m llama.train --config llama-65b --tp 8 --pp 4 --dry-run --world-size 2048 --rank 0 1337
                                                              # rank 0's and 1337's set-up, on this CPU
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from launcher import faults
from launcher.init import initialize
from launcher.rendezvous import RendezvousError
from llama.cli import Parser, fail, int_at_least, warn
from llama.config import ConfigError, RunConfig, load_config, parse_yaml, unseen_differences
from llama.data import load_mixture, rank_slice
from llama.demo_corpus import prose_text
from llama.dry_run import dry_run
from llama.fault_drill import FaultDrill
from llama.loggers import check_installed, open_loggers
from llama.metrics import MetricsWriter, device_peak_tflops, mfu, peak_memory_bytes
from llama.preemption import DEFAULT as DEFAULT_EXIT_SIGNAL
from llama.preemption import Preemption, exit_signals_arg, minutes_arg, stopped_line
from llama.setup import (  # check_batch, decays, human_bytes: re-exported, their old home
    DTYPES,
    RankSetup,
    build_rank,
    check_batch,  # noqa: F401
    decays,  # noqa: F401
    human_bytes,
    memory_breakdown,
    slurm_tasks_per_node,
    tp_node_warning,
)
from llama.sft import packed_micro_batches
from llama.shards import ShardError
from llama.tokenizer import Tokenizer, TokenizerError
from llama.validation import due, open_eval_data, validation_losses
from parallel import comm
from parallel.checkpoint import (
    CheckpointError,
    PendingSave,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from parallel.lr_schedule import lr_at
from parallel.optimizer import Optimizer
from parallel.pipeline.schedules import SCHEDULES, run_schedule
from parallel.tensor_files import TensorFileError
from parallel.topology import TopologyError


class ByteDemoData:
    """Windows of seq_len + 1 bytes of the standard library's docstrings: the fallback corpus
    when the config names no token shards. Sample i starts at an offset drawn from (seed, i)."""

    def __init__(self, seq_len: int, seed: int, text: str | None = None):
        data = (text or prose_text(max_bytes=600_000)).encode("utf-8")
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        if len(self.data) <= seq_len + 1:
            raise ValueError(f"the corpus has {len(self.data)} tokens, fewer than seq_len+1={seq_len + 1}")
        self.seq_len, self.seed = seq_len, seed
        self._cache: dict = {}

    def _offsets(self, block: int) -> np.ndarray:
        """Window offsets of samples [4096·block, 4096·(block+1)), a function of (seed, block)."""
        if block not in self._cache:
            self._cache = {block: np.random.default_rng([self.seed, block]).integers(
                0, len(self.data) - self.seq_len - 1, 4096)}
        return self._cache[block]

    def samples(self, start: int, count: int) -> torch.Tensor:
        offsets = [int(self._offsets(i // 4096)[i % 4096]) for i in range(start, start + count)]
        return torch.stack([self.data[o:o + self.seq_len + 1] for o in offsets])


def build_data(run: RunConfig):
    """The run's sample stream: the configured mixture of token shards, else the byte corpus."""
    d, m, t = run.data, run.model, run.train
    if not d.sources:
        if m.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 256 for the byte-level demo corpus")
        return ByteDemoData(t.seq_len, t.seed)
    if d.tokenizer:
        Tokenizer(d.tokenizer).check_fits(m.vocab_size)
    return load_mixture(d.sources, t.seq_len, t.seed, m.vocab_size)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    consumed_samples: int = 0
    chunks: list = field(default_factory=list)
    optimizer: Optimizer | None = None
    steps_done: int = 0           # optimiser steps behind the model when train() returned (resumed ones too)
    stopped: str | None = None    # why the run stopped before train.steps ("on SIGUSR1"); None: it did not
    saved: Path | None = None     # the last checkpoint this run wrote (the one at the stop, when it stopped)
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss, where validated


@dataclass
class CheckpointOptions:
    save_dir: str | None = None   # write checkpoints here (step_000100/, latest)
    save_every: int = 0           # every N steps (0: only at the end)
    keep: int = 3                 # the last K are kept
    resume: str | None = None     # a checkpoint directory, or a root whose `latest` is followed
    init_from: str | None = None  # weights only (converted or pretrained): a fresh optimiser and step 0
    async_save: bool = False      # copy to host memory at the step, write in the background


def train(run: RunConfig, topo, show_progress: bool = True, metrics_path=None, data=None,
          ckpt: CheckpointOptions | None = None, preemption: Preemption | None = None, eval_data=None,
          tensorboard_dir: str | None = None, wandb_project: str | None = None) -> TrainResult:
    """Train on the layout of `topo` (already initialised); every rank calls this. With a
    `preemption` (installed), every rank stops at the same step when one receives an exit signal
    or passes the exit duration, after saving a checkpoint there. `eval_data` (default: opened
    from train.eval_data) is validated on at the steps `llama.validation.due` names."""
    ckpt = ckpt or CheckpointOptions()
    m, t = run.model, run.train
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(t.seed)
    rs = build_rank(run, topo, device)
    chunks, buckets, optimizer, p2p, shape, accumulation = (rs.chunks, rs.buckets, rs.optimizer, rs.p2p, rs.shape,
                                                            rs.accumulation)
    data = data or build_data(run)
    eval_data = eval_data or open_eval_data(run)
    peak = t.peak_tflops or device_peak_tflops()
    is_logger = topo.rank == 0
    drill = FaultDrill(t.inject_fault, topo.rank)
    summary = startup_summary(run, topo, chunks, accumulation, buckets, optimizer)
    if is_logger:
        tqdm.write(summary)
    result = TrainResult(chunks=chunks, optimizer=optimizer)
    first_step = 0
    if ckpt.resume or ckpt.init_from:
        _check_saved_model(ckpt.resume or ckpt.init_from, m, resume=bool(ckpt.resume), is_logger=is_logger)
        meta = load_checkpoint(ckpt.resume or ckpt.init_from, chunks, optimizer, topo, weights_only=not ckpt.resume)
        if ckpt.resume:
            first_step, result.consumed_samples = meta["step"], meta["consumed_samples"]
            if is_logger:
                tqdm.write(f"resumed from {resolve_checkpoint(ckpt.resume)} at step {first_step} "
                           f"(saved at tp={meta['layout']['tp']} pp={meta['layout']['pp']} dp={meta['layout']['dp']})")
        elif is_logger:  # every parameter was found (or loading failed): the model's count is what was loaded
            tqdm.write(f"initialised from {resolve_checkpoint(ckpt.init_from)} (step {meta['step']}): "
                       f"{m.num_params():,} parameters, weights only; optimizer state and data position start fresh")
    loggers = open_loggers(tensorboard_dir, wandb_project, asdict(run), first_step) if is_logger else []
    writer = MetricsWriter(metrics_path if is_logger else None, append=bool(ckpt.resume), loggers=loggers)
    tokens_per_step = t.global_batch * t.seq_len
    bar = tqdm(range(first_step, t.steps), desc="train", disable=not (show_progress and is_logger),
               dynamic_ncols=True, initial=first_step, total=t.steps)
    start = time.perf_counter()
    pending = None  # a checkpoint being written in the background
    for step in bar:
        step_start = time.perf_counter()
        faults.set_phase(f"step {step}: forward/backward")
        lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        mine = rank_slice(data, result.consumed_samples, t.global_batch, topo.dp, topo.dp_rank).to(device)
        result.consumed_samples += t.global_batch
        if mine.dim() == 2:  # windows of text
            micro = [(mb[:, :-1], mb[:, 1:]) for mb in mine.split(t.micro_batch)]
        else:  # packed fine-tuning examples (llama/sft.py): the mean over the batch's trained targets
            micro = packed_micro_batches(mine, t.micro_batch, topo)
        drill.at_step_start(step, chunks, p2p)
        buckets.start_step(accumulation)
        stats = run_schedule(t.schedule, chunks, micro, p2p, topo.pp, topo.pp_rank, shape, DTYPES[t.dtype])
        faults.set_phase(f"step {step}: optimizer")
        drill.before_optimizer(step)
        grad_norm, skipped = optimizer.step(lr)
        loss = _mean_loss(stats.losses, topo, device)
        result.losses.append(loss)
        result.grad_norms.append(grad_norm)
        if skipped:
            result.skipped.append(step)
            if is_logger:
                tqdm.write(f"step {step}: gradient norm is {grad_norm}; the update was skipped")
        now = time.perf_counter()
        step_s, elapsed = now - step_start, now - start
        tokens_per_s = (step + 1 - first_step) * tokens_per_step / elapsed
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_s": step_s,
                  "tokens_per_s": tokens_per_s,
                  "tokens_per_s_per_process": tokens_per_s / topo.world,
                  "mfu": mfu(m, t.seq_len, tokens_per_s, topo.world, peak),
                  "peak_memory_bytes": peak_memory_bytes(), "skipped": skipped}
        if eval_data is not None and due(t, step):
            faults.set_phase(f"step {step}: validation")
            eval_start = time.perf_counter()
            val_loss = _mean_loss(validation_losses(eval_data, rs, topo, t, device), topo, device)
            start += time.perf_counter() - eval_start  # tokens/s counts training time only
            result.val_losses[step] = val_loss
            record |= {"val_loss": val_loss, "val_ppl": _perplexity(val_loss)}
        writer.write(record)
        val_text = f" val_loss {record['val_loss']:.4f} val_ppl {record['val_ppl']:.2f}" if "val_loss" in record else ""
        last_val = {"val": f"{next(reversed(result.val_losses.values())):.3f}"} if result.val_losses else {}
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}", step_s=f"{step_s:.2f}",
                        tok_s=f"{tokens_per_s:,.0f}", **last_val)
        if is_logger and (val_text or not show_progress and (step % t.log_every == 0 or step == t.steps - 1)):
            line = (f"step {step} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} step {step_s:.3f} s "
                    f"tokens/s {tokens_per_s:,.0f}{val_text}")
            if show_progress:  # a validation's line stays above the bar
                tqdm.write(line)
            else:
                print(line, flush=True)
        done = result.steps_done = step + 1
        if preemption and done < t.steps:  # one small all-reduce: stop here, all ranks alike?
            result.stopped = preemption.agree(topo, device)
        if pending is not None and pending.all_done():  # one small all-reduce a step while a save is written
            result.saved, pending = pending.finish(), None
        if ckpt.save_dir and (done == t.steps or result.stopped or (ckpt.save_every and done % ckpt.save_every == 0)):
            faults.set_phase(f"step {step}: saving a checkpoint")
            if pending is not None:  # a save waits for the one before
                result.saved, pending = pending.finish(), None
            last = done == t.steps or bool(result.stopped)  # written before the run ends: in the foreground
            saved = save_checkpoint(ckpt.save_dir, done, chunks, optimizer, topo, keep=ckpt.keep,
                                    meta={"consumed_samples": result.consumed_samples, "config": asdict(run)},
                                    background=ckpt.async_save and not last)
            if isinstance(saved, PendingSave):
                pending = saved
            else:
                result.saved = saved
        if result.stopped:
            break
    if pending is not None:
        result.saved = pending.finish()
    optimizer.wait_params()  # the chunks handed back hold every dp rank's update
    writer.close()
    return result


def _check_saved_model(path, model_cfg, resume: bool, is_logger: bool) -> None:
    """What the tensors' shapes cannot show, compared with the checkpoint's model config. A tie
    that differs loses or lacks the head's weights: an error. RoPE or norm settings that differ
    are an error for a resume, and a warning for --init-from (raising rope_theta to extend the
    context is a fine-tuning recipe). Every rank reads the same meta.json, so all fail alike."""
    saved = (read_meta(resolve_checkpoint(path)).get("config") or {}).get("model") or {}
    diffs = unseen_differences(saved, model_cfg)
    if not diffs:
        return
    where = f"checkpoint {str(path)!r} and the model config differ in what tensor shapes do not show"
    if resume or any(d.startswith("tie_word_embeddings") for d in diffs):
        raise CheckpointError(f"{where}: {'; '.join(diffs)}; set the config to match (--set model.KEY=VALUE)")
    if is_logger:
        warn("llama-train", f"{where}: {'; '.join(diffs)}; training goes on with the config's values")


def startup_summary(run: RunConfig, topo, chunks, accumulation: int, buckets, optimizer) -> str:
    """What rank 0 prints before the first step: parameters, layout, batch and memory (the
    weights, gradient buckets and optimizer state as allocated, the activations predicted).
    Every rank calls it (the per-rank maximum is a collective)."""
    m, t = run.model, run.train
    params = [p for c in chunks for p in c.parameters()]
    local = sum(p.numel() for p in params)
    most = torch.tensor([local], dtype=torch.float64)
    if topo.world > 1:
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=topo.world_group)
    mem = memory_breakdown(run, topo, RankSetup(chunks, params, buckets, optimizer, None, None, accumulation))
    size = {k: human_bytes(v) for k, v in mem.items()}
    sp = " sp" if t.sp and topo.tp > 1 else ""
    return (f"model: {m.num_params():,} parameters; {local:,} on rank 0, at most {int(most.item()):,} on a rank\n"
            f"layout: world {topo.world} = tp {topo.tp}{sp} x pp {topo.pp} (vpp {t.vpp}, {t.schedule}) x dp {topo.dp}; "
            f"{t.dtype}, recompute {t.recompute}{', distributed optimizer' if t.distributed_optimizer else ''}\n"
            f"batch: {t.global_batch} sequences x {t.seq_len} tokens = {t.global_batch * t.seq_len:,} tokens per step; "
            f"{accumulation} micro-batches of {t.micro_batch} per dp rank\n"
            f"predicted memory on rank 0: {size['total']} (weights {size['weights']}, gradients "
            f"{size['gradients']}, optimizer {size['optimizer']}, activations {size['activations']})")


def _mean_loss(losses: list[float], topo, device) -> float:
    """The step's loss: mean over micro-batches and dp ranks, known to every rank."""
    mine = sum(losses) / len(losses) / topo.dp if losses and topo.tp_rank == 0 else 0.0
    if topo.world == 1:
        return mine
    total = torch.tensor([mine], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=topo.world_group)
    comm._record("loss_all_reduce", total)
    return total.item()


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def parse_overrides(items: list[str]) -> dict:
    """`section.key=value` pairs (value parsed as YAML, `1e-3` a number) → {"section": {"key": value}}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train", "data"):
            raise ConfigError(f"--set {item!r} must look like SECTION.KEY=VALUE, SECTION one of model, train, data")
        out.setdefault(section, {})[name] = parse_yaml(value, f"--set {item!r}")
    return out


FLAGS = {  # command-line flag -> train config key
    "tp": "tp", "pp": "pp", "dp": "dp", "sp": "sp", "schedule": "schedule", "vpp": "vpp",
    "micro_batch_size": "micro_batch", "global_batch_size": "global_batch", "seq_len": "seq_len",
    "steps": "steps", "lr": "lr", "seed": "seed", "dtype": "dtype", "distributed_optimizer": "distributed_optimizer",
    "overlap_param_gather": "overlap_param_gather",
    "recompute": "recompute", "attention": "attention", "peak_tflops": "peak_tflops",
    "eval_data": "eval_data", "eval_every": "eval_every", "eval_iters": "eval_iters",
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llama-train", description=__doc__)
    p.add_argument("--config", default="tiny", help="a preset name (configs/*.yaml) or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set model.n_layers=2 (repeatable; default: none)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the config's train.tp)")
    p.add_argument("--pp", type=int, help="pipeline-parallel size (default: the config's train.pp)")
    p.add_argument("--dp", type=int,
                   help="data-parallel size (default: the config's train.dp; 0 there: world / (tp*pp))")
    p.add_argument("--sp", action="store_true", default=None,
                   help="sequence parallelism, needs tp > 1 to matter (default: the config's train.sp)")
    p.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule (default: the config's train.schedule)")
    p.add_argument("--vpp", type=int,
                   help="model chunks per pipeline rank, interleaved schedule (default: the config's train.vpp)")
    p.add_argument("--micro-batch-size", type=int,
                   help="sequences per micro-batch (default: the config's train.micro_batch)")
    p.add_argument("--global-batch-size", type=int,
                   help="sequences per optimiser step, all dp ranks (default: the config's train.global_batch)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's train.seq_len)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: the config's train.steps)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the config's train.lr)")
    p.add_argument("--seed", type=int, help="initialisation and data seed (default: the config's train.seed)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="precision (default: the config's train.dtype)")
    p.add_argument("--distributed-optimizer", action="store_true", default=None,
                   help="shard master weights and Adam state over dp, ZeRO-1 "
                        "(default: the config's train.distributed_optimizer)")
    p.add_argument("--overlap-param-gather", action="store_true", default=None,
                   help="with --distributed-optimizer: all-gather the updated parameters behind the next "
                        "step's forward, bucket by bucket (default: the config's train.overlap_param_gather)")
    p.add_argument("--recompute", choices=["none", "selective", "full"],
                   help="activation checkpointing (default: the config's train.recompute)")
    p.add_argument("--attention", choices=["auto", "sdpa", "xformers"],
                   help="attention backend (default: the config's train.attention)")
    p.add_argument("--peak-tflops", type=float,
                   help="device peak (bf16 TFLOP/s) for MFU (default: the config's train.peak_tflops; "
                        "0 there: known GPUs only)")
    p.add_argument("--metrics", metavar="PATH", help="rank 0 writes one JSON line per step here (default: none)")
    p.add_argument("--eval-data", metavar="PATH",
                   help="a held-out token shard (PREFIX of .bin/.idx): validation loss after the last step and "
                        "every --eval-every steps (default: the config's train.eval_data; empty: none)")
    p.add_argument("--eval-every", type=int_at_least(1), metavar="N",
                   help="validate every N steps (default: the config's train.eval_every; 0 there: after the "
                        "last step only)")
    p.add_argument("--eval-iters", type=int_at_least(1), metavar="K",
                   help="global batches per validation, the shard's first K, the same every time "
                        "(default: the config's train.eval_iters)")
    p.add_argument("--tensorboard-dir", metavar="DIR",
                   help="rank 0 writes every numeric metric as a TensorBoard scalar here (default: none)")
    p.add_argument("--wandb-project", metavar="NAME",
                   help="rank 0 logs every numeric metric to this W&B project, offline unless WANDB_MODE says "
                        "otherwise (default: none)")
    p.add_argument("--save", metavar="DIR",
                   help="write checkpoints under DIR (step_000100/, latest) (default: no checkpoints)")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps and at the end; 0: only at the end")
    p.add_argument("--keep", type=int, default=3, metavar="K", help="keep the last K checkpoints")
    p.add_argument("--async-save", action="store_true",
                   help="copy each checkpoint to host memory at its step and write it while training goes on "
                        "(the last one, and one at a stop, are written before exiting)")
    p.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue from a checkpoint: PATH, or without PATH the latest under --save "
                        "(default: start at step 0)")
    p.add_argument("--exit-signal", type=exit_signals_arg, default=DEFAULT_EXIT_SIGNAL, metavar="SIGNALS",
                   help="on these signals (any rank), every rank stops at the next step, saves to --save and exits 0: "
                        "USR1, TERM, USR2, INT, HUP, a comma list (TERM,USR1), or none")
    p.add_argument("--exit-duration-minutes", type=minutes_arg, metavar="M",
                   help="stop the same way once M minutes have passed since start-up (default: no limit)")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from these weights, any layout; a converted model (default: a fresh initialisation)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a collective may wait before every rank gives up (a dead or stuck peer)")
    p.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="set up --rank's part of a --world-size job in this one CPU process (fake process group, "
                        "meta device; no data, no compute) and print its groups, parameters, memory and traffic "
                        "per step, or the error the real job would give (default: train)")
    p.add_argument("--world-size", type=int_at_least(1), metavar="N",
                   help="the job's number of ranks, with --dry-run (default: none; required by --dry-run)")
    p.add_argument("--rank", type=int_at_least(0), nargs="+", metavar="R",
                   help="the ranks to dry-run, with --dry-run (default: 0)")
    p.add_argument("--gpus-per-node", type=int_at_least(1), metavar="G",
                   help="ranks per node, to place peers on nodes in the dry run (default: SLURM_NTASKS_PER_NODE "
                        "or SLURM_TASKS_PER_NODE when set, else 8)")
    return p


def _dry_run_world(args) -> int:
    if not args.dry_run:
        raise ConfigError("--world-size and --rank go with --dry-run")
    if args.world_size is None:
        raise ConfigError("--dry-run needs --world-size N, the job's number of ranks")
    return args.world_size


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    preemption = Preemption(args.exit_signal, args.exit_duration_minutes)  # the exit-duration clock starts here
    topo = None  # unknown until initialize() returns: a failure inside it names no group
    try:
        overrides = parse_overrides(args.set)
        flags = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
        overrides.setdefault("train", {}).update(flags)
        run = load_config(args.config, overrides)
        t = run.train
        if args.dry_run or args.world_size is not None or args.rank is not None:
            print(dry_run(run, _dry_run_world(args), args.rank or [0],
                          args.gpus_per_node or slurm_tasks_per_node() or 8), flush=True)
            return 0
        check_installed(args.tensorboard_dir, args.wandb_project)
        eval_data = open_eval_data(run)  # a bad held-out shard fails here, before the rendezvous
        preemption.install()  # before the rendezvous: a signal during start-up stops the run at its first step
        topo = initialize(t.tp, t.pp, t.dp or None, timeout_s=args.timeout)
        faults.start(topo.rank, topo.world, args.timeout)
        preemption.install()  # again: faults.start took SIGUSR1 (stack dumps) and SIGTERM (its heartbeat)
        if topo.rank == 0 and (crossing := tp_node_warning(topo)):
            warn("llama-train", crossing)
        resume = args.resume
        if resume == "":
            if not args.save:
                raise ConfigError("--resume without a PATH needs --save DIR to find the latest checkpoint")
            resume = args.save if (Path(args.save) / "latest").is_file() else None
            if resume is None and topo.rank == 0:
                print(f"--resume: no checkpoint under {args.save} yet: starting fresh", flush=True)
        ckpt = CheckpointOptions(args.save, args.save_every, args.keep, resume, args.init_from, args.async_save)
        result = train(run, topo, show_progress=not args.no_progress, metrics_path=args.metrics, ckpt=ckpt,
                       preemption=preemption, eval_data=eval_data, tensorboard_dir=args.tensorboard_dir,
                       wandb_project=args.wandb_project)
    except (ConfigError, ShardError, TokenizerError, TopologyError, RendezvousError, CheckpointError,
            TensorFileError, ValueError) as err:
        code = fail("llama-train", err)
        if dist.is_initialized():  # maybe this rank's alone: its peers will name it at their timeout
            faults.record_own_failure(dist.get_rank(), err)
        faults.stop("exited after an input error")
        return code
    except Exception as err:  # a failure during the run: name the rank that failed first
        if not dist.is_initialized():
            raise
        if not faults.is_peer_failure(err):
            traceback.print_exc()  # this rank's own failure: its traceback is what the user needs
        line = faults.failure_line("llama-train", err, dist.get_rank(), dist.get_world_size(), args.timeout,
                                   faults.group_names(topo) if topo else {})
        sys.stderr.flush()
        faults.report(line)
        faults.stop("exited after a failure")
        faults.linger_for_reporters(dist.get_rank(), dist.get_world_size(), args.timeout)
        # Exit now: interpreter teardown with a broken process group can abort (SIGABRT) or hang.
        sys.stdout.flush()
        os._exit(1)
    faults.stop("exited")
    if topo.rank == 0 and result.stopped:
        print(stopped_line(result.steps_done, run.train.steps, result.stopped, result.saved, args.save), flush=True)
    elif topo.rank == 0 and not result.losses:
        print(f"nothing to do: the run already reached train.steps={run.train.steps}", flush=True)
    elif topo.rank == 0:
        losses = result.losses
        vals = list(result.val_losses.values())
        val = f"; validation loss {vals[-1]:.3f} (perplexity {_perplexity(vals[-1]):.1f})" if vals else ""
        print(f"loss: first step {losses[0]:.3f}, last step {losses[-1]:.3f} "
              f"(mean of last 10: {sum(losses[-10:]) / len(losses[-10:]):.3f}){val}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
