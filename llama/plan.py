"""`llama-plan` / `python -m llama.plan`: before the allocation, which layouts fit N GPUs, how
fast each runs, how many days, GPU-hours and tonnes of CO2 the token budget costs.

    llama-plan --config llama-65b --gpus 2048 --gpu a100-80gb --seq-len 2048 --global-batch-tokens 4M --tokens 1.4T
    llama-plan --config tiny --gpus 2 --gpu cpu-local --tp 2          # this machine, after --calibrate
    llama-plan --calibrate                                            # measure cpu-local (about 20 s)

Batch sizes count in powers of two (4M = 4·2^20 tokens = 2048 sequences of 2048, the paper's
batch); token budgets in powers of ten (1.4T = 1.4·10^12, the paper's). Candidates: tp within a
node, pp, vpp (interleaved), dp, micro-batch, recompute, sp, ZeRO-1; any of them can be fixed.
The model is `llama.perf_model`: memory from the trainer's own set-up on the meta device,
work counted on the real model (`llama.step_profile`), seconds from `configs/hardware/gpus.yaml`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from llama import hardware
from llama.cli import Parser, fail, int_at_least
from llama.config import ConfigError, load_config
from llama.perf_model import Layout, Prediction, checkpoint_save, predict
from llama.setup import human_bytes
from parallel.topology import TopologyError, divisors, tp_groups_crossing_nodes

SUFFIX = {"": 1, "K": 1, "M": 2, "G": 3, "B": 3, "T": 4}


def parse_amount(text: str, base: int, what: str) -> float:
    """'4M' → 4·base², '1.4T' → 1.4·base⁴; a plain number is itself."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGBT]?)\s*", text or "", re.IGNORECASE)
    if not match:
        raise ConfigError(f"{what}={text!r} is not an amount like 4M or 1.4T")
    value = float(match.group(1)) * base ** SUFFIX[match.group(2).upper()]
    if value <= 0:
        raise ConfigError(f"{what}={text!r} must be positive")
    return value


def candidates(n_gpus: int, hw: hardware.Hardware, n_layers: int, global_batch: int, fixed: dict) -> list[Layout]:
    """Every layout of n_gpus the trainer accepts, tp within a node, filtered by `fixed`."""
    out = []
    per_node = hw.gpus_per_node
    for tp in [d for d in divisors(per_node) if n_gpus % d == 0]:
        for pp in divisors(n_layers):
            if n_gpus % (tp * pp):
                continue
            dp = n_gpus // (tp * pp)
            for vpp in [v for v in divisors(n_layers // pp) if v <= 8 and (pp > 1 or v == 1)]:
                for mb in (1, 2, 4, 8):
                    if global_batch % (mb * dp):
                        continue
                    m = global_batch // (mb * dp)
                    if vpp > 1 and m % pp:
                        continue
                    for recompute in ("none", "selective", "full"):
                        for sp in ((True, False) if tp > 1 else (False,)):
                            # ZeRO-1 moves the same bytes and holds less: searched only when fixed off
                            for zero1 in ((fixed.get("distributed_optimizer", True),) if dp > 1 else (False,)):
                                out.append(Layout(tp, pp, dp, vpp, mb, sp, recompute, zero1))
    return [c for c in out if all(getattr(c, k) == v for k, v in fixed.items())]


def check_fixed(n_gpus: int, hw: hardware.Hardware, fixed: dict) -> None:
    """The fixed part of the layout, checked against the GPUs before any search: one line each."""
    tp, pp = fixed.get("tp", 1), fixed.get("pp", 1)
    if n_gpus % (tp * pp):
        raise TopologyError(f"--gpus {n_gpus} is not divisible by tp*pp={tp}*{pp}; "
                            f"choose tp*pp in {divisors(n_gpus)}")
    if tp_groups_crossing_nodes(tp, n_gpus, hw.gpus_per_node):
        raise TopologyError(f"tp={tp} would span nodes of {hw.gpus_per_node} GPUs ({hw.name}): tensor-parallel "
                            f"groups must sit inside a node (tp dividing {hw.gpus_per_node}), where NVLink is")


def plan(run, n_gpus: int, hw: hardware.Hardware, tokens: float, fixed: dict) -> tuple[list[Prediction], int]:
    """Predictions for every accepted candidate, fastest first (those that fit before those that
    do not), and how many candidates the trainer's checks refused."""
    check_fixed(n_gpus, hw, fixed)
    preds, refused, first_error = [], 0, None
    for layout in candidates(n_gpus, hw, run.model.n_layers, run.train.global_batch, fixed):
        try:
            preds.append(predict(run, layout, hw, tokens))
        except (ConfigError, TopologyError, ValueError) as err:  # the trainer's own refusal
            refused += 1
            first_error = first_error or err
    if not preds:
        if first_error:
            raise first_error
        raise ConfigError(f"no layout of {n_gpus} GPUs passes the trainer's checks with the fixed choices {fixed}")
    preds.sort(key=lambda p: (not p.fits, -p.tokens_per_s_per_gpu))
    return preds, refused


def _row(rank, p: Prediction) -> str:
    t = p.time
    mem = f"{p.memory['total'] / 2**30:6.1f}" + ("" if p.fits else " !")
    return (f"{rank:>3} {str(p.layout):<38} {mem:>8} {t['total']:7.2f} {t['compute']:6.2f} {t['tp_comm']:5.2f} "
            f"{t['pp_p2p']:5.2f} {t['bubble']:5.2f} {t['dp_comm']:5.2f} {p.tokens_per_s_per_gpu:8,.0f} "
            f"{100 * p.mfu:5.1f} {p.days:7.1f}")


def table(preds: list[Prediction], hw, n_gpus: int, run, tokens: float, top: int, refused: int) -> str:
    t = run.train
    best = preds[0]
    lines = [f"{run.model.num_params() / 1e9:.1f}B parameters on {n_gpus} x {hw.name} ({hw.description}); "
             f"{t.global_batch} sequences x {t.seq_len} tokens per step; {tokens:.3g} tokens",
             f"{len(preds)} layouts ({sum(p.fits for p in preds)} fit in {hw.usable_bytes / 2**30:.0f} GiB usable"
             f"{f'; {refused} refused by the trainer' if refused else ''}); fastest first:",
             f"{'':>3} {'layout':<38} {'GiB/GPU':>8} {'step s':>7} {'comp':>6} {'tp':>5} {'pp':>5} {'bubl':>5} "
             f"{'dp':>5} {'tok/s/GPU':>8} {'MFU%':>5} {'days':>7}"]
    lines += [_row(i + 1, p) for i, p in enumerate(preds[:top])]
    mem = best.memory
    lines += ["", f"best: {best.layout}: {best.params_per_gpu:,} parameters on the fullest GPU; memory "
                  f"{human_bytes(mem['total'])} = weights {human_bytes(mem['weights'])} + gradients "
                  f"{human_bytes(mem['gradients'])} + optimizer {human_bytes(mem['optimizer'])} + activations "
                  f"{human_bytes(mem['activations'])} + logits {human_bytes(mem['logits'])} + backward's working set "
                  f"{human_bytes(mem['working'])}",
              f"      {best.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {100 * best.mfu:.1f}%, {best.days:.1f} days, "
              f"{best.gpu_hours:,.0f} GPU-hours, {best.mwh:,.0f} MWh, {best.tco2eq:,.0f} tCO2eq "
              f"({hw.power_w:.0f} W, PUE 1.1, 0.385 kg/kWh)"]
    if not best.fits:
        lines.append("      (! : does not fit in memory)")
    return "\n".join(lines)


def as_json(p: Prediction) -> dict:
    return {"layout": dataclasses.asdict(p.layout), "fits": p.fits, "memory_bytes": p.memory, "step_s": p.time,
            "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu, "mfu": p.mfu, "days": p.days,
            "gpu_hours": p.gpu_hours, "mwh": p.mwh, "tco2eq": p.tco2eq, "params_per_gpu": p.params_per_gpu}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llama-plan", description=__doc__)
    p.add_argument("--config", default="llama-7b", help="a preset name (configs/*.yaml) or a YAML path")
    p.add_argument("--gpus", type=int_at_least(1), default=8, help="GPUs (processes on cpu-local) in the job")
    p.add_argument("--gpu", default="a100-80gb",
                   help=f"the hardware, from configs/hardware/gpus.yaml: {', '.join(hardware.names())}")
    p.add_argument("--seq-len", type=int_at_least(1), help="tokens per sequence (default: the config's train.seq_len)")
    p.add_argument("--global-batch-tokens", metavar="N",
                   help="tokens per step, powers of two: 4M = 2048 x 2048 (default: the config's global batch)")
    p.add_argument("--tokens", metavar="N",
                   help="the token budget, powers of ten: 1.4T (default: the config's train.total_tokens)")
    p.add_argument("--tp", type=int_at_least(1), help="fix tensor-parallel size (default: search)")
    p.add_argument("--pp", type=int_at_least(1), help="fix pipeline-parallel size (default: search)")
    p.add_argument("--vpp", type=int_at_least(1), help="fix model chunks per pipeline rank (default: search)")
    p.add_argument("--micro-batch-size", type=int_at_least(1), help="fix sequences per micro-batch (default: search)")
    p.add_argument("--sp", action=argparse.BooleanOptionalAction, help="fix sequence parallelism (default: search)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], help="fix recompute (default: search)")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction,
                   help="fix ZeRO-1 (default: search)")
    p.add_argument("--write-gbps-per-node", type=float, default=2.0, metavar="GB/S",
                   help="a node's write bandwidth to the checkpoint file system, for the save time (default: 2)")
    p.add_argument("--top", type=int_at_least(1), default=10, help="rows of the table")
    p.add_argument("--json", action="store_true", help="print every candidate as JSON instead of the table")
    p.add_argument("--calibrate", action="store_true",
                   help=f"measure this machine as the cpu-local hardware and save it ({hardware.CALIBRATION})")
    return p


FIXED = {"tp": "tp", "pp": "pp", "vpp": "vpp", "micro_batch_size": "micro_batch", "sp": "sp",
         "recompute": "recompute", "distributed_optimizer": "distributed_optimizer"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.calibrate:
            measured = hardware.calibrate(Path(hardware.CALIBRATION))
            print(f"cpu-local: best GEMM {measured['peak_tflops'] * 1e3:.1f} GFLOP/s per process, memory "
                  f"{measured['hbm_gbps']:.1f} GB/s, gloo {measured['intra_node_gbps']:.2f} GB/s and "
                  f"{measured['intra_latency_s'] * 1e6:.0f} us; saved to {hardware.CALIBRATION}")
            return 0
        if args.write_gbps_per_node <= 0:
            raise ConfigError(f"--write-gbps-per-node={args.write_gbps_per_node:g} must be positive")
        hw = hardware.load(args.gpu)
        run = load_config(args.config)
        t = run.train
        seq = args.seq_len or t.seq_len
        batch = t.global_batch * seq if args.global_batch_tokens is None else \
            parse_amount(args.global_batch_tokens, 1024, "--global-batch-tokens")
        if batch % seq:
            raise ConfigError(f"--global-batch-tokens={batch:.0f} is not a multiple of --seq-len={seq}")
        tokens = t.total_tokens if args.tokens is None else parse_amount(args.tokens, 1000, "--tokens")
        if tokens <= 0:
            raise ConfigError(f"the token budget {tokens:g} must be positive (--tokens)")
        run = dataclasses.replace(run, train=dataclasses.replace(t, seq_len=seq, global_batch=int(batch // seq),
                                                                  total_tokens=tokens))
        fixed = {key: getattr(args, flag) for flag, key in FIXED.items() if getattr(args, flag) is not None}
        preds, refused = plan(run, args.gpus, hw, tokens, fixed)
        if not any(p.fits for p in preds):
            small = min(preds, key=lambda p: p.memory["total"])
            raise ConfigError(f"{args.config} fits no layout of {args.gpus} x {hw.name}: the smallest, {small.layout}, "
                              f"needs {human_bytes(small.memory['total'])} per GPU of "
                              f"{human_bytes(hw.usable_bytes)} usable; add GPUs or memory")
    except (ConfigError, TopologyError, ValueError) as err:
        return fail("llama-plan", err)
    saves = [checkpoint_save(p, run, hw, args.write_gbps_per_node) for p in preds]
    if args.json:
        print(json.dumps([{**as_json(p), "checkpoint_save": save} for p, save in zip(preds, saves)], indent=1))
    else:
        save = saves[0]
        print(table(preds, hw, args.gpus, run, tokens, args.top, refused))
        print(f"      checkpoint: {human_bytes(save['total_bytes'])} from every GPU at once, "
              f"{human_bytes(save['bytes_per_gpu'])} each, {human_bytes(save['bytes_per_node'])} a node: "
              f"{save['seconds']:.1f} s at {args.write_gbps_per_node:g} GB/s per node")
    return 0


if __name__ == "__main__":
    sys.exit(main())
