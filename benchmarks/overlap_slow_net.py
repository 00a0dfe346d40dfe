"""How much of each communication the library hides behind compute, on a network that costs
what a real one costs.

    python -m benchmarks.overlap_slow_net [--rates off 1gbit 200mbit] [--rounds 6] [--cases dp zero tp sp pp]

Each rate runs in its own `../shared/tools/slow-net RATE` namespace (root only): loopback is
rate-limited there, so the gloo traffic between the 2 local ranks (1 thread each) costs what it
would cost between machines; `off` is the same namespace unlimited, the control. Per case, in
the same 2 processes:

- T_on, T_off: the step with the overlap on and off, interleaved round by round (median);
- T_comm: that communication alone (the same collectives on the same buffers, nothing else);
- T_compute: the compute it can hide behind, from the overlap-off run: backward for the
  gradient reductions (dp) and the tp input-gradient collectives (the column layers' backward
  GEMMs), the forward for the ZeRO-1 parameter gather;
- hidden = (T_off − T_on) / min(T_comm, T_compute): 1 hides all that can be hidden;
- waits on/off: what the step waits for that communication in each setting, and "by waits" =
  (waits_off − waits_on) / min(T_comm, T_compute): the same fraction without the step-time
  noise, and without what the overlap costs the compute on 2 cores shared by 2 ranks, their
  communication threads and the kernel's network stack ("compute on/off": the hideable
  compute's time with the overlap on, over off).

Cases: dp (bucketed all-reduce during backward), zero (the same as reduce-scatter, distributed
optimizer), zero-gather (ZeRO-1's parameter all-gather behind the next forward), tp and sp
(column layers' input-gradient all-reduce / reduce-scatter during the weight-gradient GEMM),
pp (1F1B: p2p transfer time exposed, against the schedule's own bubble at rate `off`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.timing import interleaved, medians
from llama.config import LlamaConfig
from llama.model import Transformer
from llama.parallelize import build_chunks
from parallel import comm, layers
from parallel.data_parallel import GradBuckets
from parallel.layers import TensorParallel
from parallel.optimizer import Optimizer
from parallel.params import init_parameters
from parallel.pipeline.p2p import PipelineP2P
from parallel.pipeline.schedules import run_schedule
from tests.distributed import run_on_ranks, topology

CFG = LlamaConfig(dim=256, n_layers=4, n_heads=8, vocab_size=2048, multiple_of=64, max_seq_len=256)
BATCH, SEQ = 4, 256
# tp moves activations, whose bytes grow with dim and the GEMMs hiding them with dim²: at dim 256
# a weight-gradient GEMM hides a tenth of its collective; at 1024 about as much as it costs at 1gbit
CFG_TP = LlamaConfig(dim=1024, n_layers=2, n_heads=8, vocab_size=2048, multiple_of=64, max_seq_len=256)
BATCH_TP = 2
GOALS = {"dp": 0.8, "zero": 0.8, "zero-gather": 0.6, "tp": 0.5, "sp": 0.5}
SLOW_NET = Path(os.environ.get("SLOW_NET", Path(__file__).resolve().parents[2] / "shared/tools/slow-net"))


def _tokens(seed: int):
    return torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _comm_alone(launches) -> float:
    """Seconds for collectives launched together and then waited for, after a barrier."""
    dist.barrier()
    start = time.perf_counter()
    for finish in [launch() for launch in launches]:
        finish()
    return time.perf_counter() - start


class Clock:
    """Seconds spent inside wrapped calls, summed until `take()`."""

    def __init__(self):
        self.s = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s += time.perf_counter() - start
        return timed

    def wrap_start(self, start_fn):
        """A collective's start function whose `finish()` (the waiting) is timed."""
        return lambda *args, **kwargs: self.wrap(start_fn(*args, **kwargs))

    def take(self) -> float:
        s, self.s = self.s, 0.0
        return s


def _blocks(step, rounds: int, per_block: int, end):
    """Median seconds per step over `rounds` blocks of `per_block` timed steps, for an overlap
    that runs on past its step (the parameter gather): each block starts with an untimed step
    (so the first timed step finds that step's gathers in flight, as in training) and ends with
    an untimed `end()` (so nothing one setting leaves in flight runs during the other's block)."""
    times = {name: [] for name in step}
    for r in range(rounds + 1):
        for name in step if r % 2 else list(step)[::-1]:
            step[name]()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(per_block):
                step[name]()
            times[name].append((time.perf_counter() - start) / per_block)
            end[name]()
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def _data_parallel(case: str, rounds: int, bucket_mb: float) -> dict:
    """dp / zero: overlap of the gradient reductions with backward; zero-gather: of ZeRO-1's
    parameter all-gather with the next forward. `exposed`: what the step waits for that
    communication, per setting."""
    topo = topology()
    zero = case != "dp"
    gather = case == "zero-gather"
    runs, backward, forward = {}, {True: [], False: []}, {True: [], False: []}
    clocks = {True: Clock(), False: Clock()}
    exposed = {True: [], False: []}
    for on in (True, False):
        model = Transformer(CFG, attention="sdpa")
        init_parameters(model, 0)
        buckets = GradBuckets(list(model.parameters()), topo.dp_group, bucket_mb, reduce_scatter=zero,
                              overlap=on or gather)
        opt = Optimizer(buckets, topo, 1e-4, distributed=zero, overlap_param_gather=on and gather)
        if gather:  # the waits: the blocking gathers (off), the forward's waits per bucket (on)
            opt.wait_params = clocks[on].wrap(opt.wait_params)
        else:  # the waits (and, off, the launches) of the gradient reductions
            buckets.finish = clocks[on].wrap(buckets.finish)
        opt.wait_before_forward([model])
        runs[on] = (model, buckets, opt)
    tokens = _tokens(topo.dp_rank)

    def step(on: bool) -> None:
        model, buckets, opt = runs[on]
        buckets.start_step(1)
        before = clocks[on].s
        loss, fwd = _timed(lambda: model(tokens, tokens))
        fwd -= clocks[on].s - before  # the forward's own compute: not its waits for the gathers
        _, bwd = _timed(loss.backward)
        opt.step(1e-4)
        wait = clocks[on].take()
        forward[on].append(fwd)
        backward[on].append(bwd)
        exposed[on].append(wait)

    steps = {"on": lambda: step(True), "off": lambda: step(False)}
    if gather:
        times = _blocks(steps, rounds, 3, {"on": runs[True][2].wait_params, "off": lambda: None})
    else:
        times = medians(interleaved(steps, rounds, dist.barrier))
    model, buckets, opt = runs[False]
    if gather:  # the optimizer's own gathers (this one's block at once): every rank's slice again
        launches = [lambda: (opt._gather_params(), lambda: None)[1]]
    else:
        start = comm.reduce_scatter_start if zero else comm.all_reduce_start
        launches = [lambda b=b: start(b.grad.clone(), topo.dp_group) for b in buckets.buckets]
    t_comm = statistics.median(_comm_alone(launches) for _ in range(rounds))
    hideable = forward if gather else backward
    return dict(on=times["on"], off=times["off"], comm=t_comm, compute=statistics.median(hideable[False]),
                compute_on=statistics.median(hideable[True]),
                exposed_on=statistics.median(exposed[True]), exposed_off=statistics.median(exposed[False]))


def _tensor_parallel(case: str, rounds: int, bucket_mb: float) -> dict:
    """tp / sp: a column layer's input-gradient collective (and under sp the input re-gather)
    during its backward GEMMs. T_comm: what the overlap-off backward waits for those
    collectives; T_compute: the GEMMs they can hide behind (weight gradients; under sp the
    input-gradient GEMM too), from the overlap-off run; `exposed`: what each setting waits."""
    group = topology(tp=2).tp_group
    sp = case == "sp"
    models = {}
    for on in (True, False):
        model = Transformer(CFG_TP, tp=TensorParallel(group, sp=sp, overlap=on), attention="sdpa")
        init_parameters(model, 0)
        models[on] = (model, GradBuckets(list(model.parameters()), None, tp_group=group))  # as the trainer
    tokens = _tokens(0)[:BATCH_TP]  # the same on both tp ranks
    waits, gemms, backward = Clock(), Clock(), Clock()
    samples = {"on": [], "off": [], "compute": [], "compute_on": []}
    originals = (layers.sp_all_gather_start, layers.sp_reduce_scatter_start, comm.all_reduce_start,
                 layers._weight_grad, layers._ParallelMatmuls.backward)

    def step(on: bool) -> None:
        model, buckets = models[on]
        buckets.start_step(1)
        model(tokens, tokens).backward()
        buckets.finish()
        wait = waits.take()
        samples["on" if on else "off"].append(wait)
        # the hideable compute: under sp all of the column backward but its waits; else the weight-gradient GEMMs
        samples["compute_on" if on else "compute"].append(backward.take() - wait if sp else gemms.take())
        backward.take(), gemms.take()

    layers.sp_all_gather_start = waits.wrap_start(originals[0])
    layers.sp_reduce_scatter_start = waits.wrap_start(originals[1])
    comm.all_reduce_start = waits.wrap_start(originals[2])
    layers._weight_grad = gemms.wrap(originals[3])
    layers._ParallelMatmuls.backward = staticmethod(backward.wrap(originals[4]))
    try:
        times = medians(interleaved({"on": lambda: step(True), "off": lambda: step(False)}, rounds,
                                    lambda: dist.barrier(group)))
    finally:
        (layers.sp_all_gather_start, layers.sp_reduce_scatter_start, comm.all_reduce_start,
         layers._weight_grad) = originals[:4]
        layers._ParallelMatmuls.backward = staticmethod(originals[4])
    return dict(on=times["on"], off=times["off"], comm=statistics.median(samples["off"]),
                compute=statistics.median(samples["compute"]), compute_on=statistics.median(samples["compute_on"]),
                exposed_on=statistics.median(samples["on"]),
                exposed_off=statistics.median(samples["off"]))


def _pipeline(case: str, rounds: int, bucket_mb: float) -> dict:
    """pp=2, 1F1B, 8 micro-batches of 1: the time a stage waits on receives (its bubble plus
    exposed transfers), and the step's transfers alone."""
    topo = topology(pp=2)
    chunks = build_chunks(CFG, topo, seed=0, attention="sdpa")
    p2p = PipelineP2P(topo)
    tokens = _tokens(0)  # stage 0 reads the tokens, stage 1 the targets
    micro = [(t[None], t[None]) for t in tokens.repeat(2, 1)]  # 8 micro-batches of one sequence
    shape = (1, SEQ, CFG.dim)
    stats = []

    def step():
        stats.append(run_schedule("1f1b", chunks, micro, p2p, 2, topo.pp_rank, shape, torch.float32))
        for c in chunks:
            c.zero_grad(set_to_none=True)

    step_s = statistics.median(interleaved({"step": step}, rounds, dist.barrier)["step"])
    stats = stats[1:]
    # the step's transfers alone: 8 activations forward and 8 gradients back, at the same time
    peer = topo.pp_ranks[1 - topo.pp_rank]
    send = [torch.randn(shape) for _ in micro]
    recv = [torch.empty(shape) for _ in micro]

    def transfers():
        ops = [dist.P2POp(dist.isend, s, peer, tag=i) for i, s in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, r, peer, tag=i) for i, r in enumerate(recv)]
        return lambda: [w.wait() for w in dist.batch_isend_irecv(ops)]
    t_comm = statistics.median(_comm_alone([transfers]) for _ in range(rounds))
    return dict(step=step_s, idle=statistics.median(s.idle_s for s in stats),
                busy=statistics.median(s.busy_s for s in stats), comm=t_comm)


CASES = {"dp": _data_parallel, "zero": _data_parallel, "zero-gather": _data_parallel,
         "tp": _tensor_parallel, "sp": _tensor_parallel, "pp": _pipeline}


def _measure(cases, rounds: int, bucket_mb: float) -> dict:
    torch.set_num_threads(1)
    return {case: run_on_ranks(CASES[case], 2, case, rounds, bucket_mb, timeout=900)[0] for case in cases}


def _under(rate: str, args) -> dict:
    if os.geteuid() != 0 or not SLOW_NET.exists():
        sys.exit(f"overlap_slow_net: needs root and {SLOW_NET} (set SLOW_NET=PATH): run as root, or with --inner")
    cmd = [str(SLOW_NET), rate, "--", sys.executable, "-m", "benchmarks.overlap_slow_net", "--inner",
           "--rounds", str(args.rounds), "--bucket-mb", str(args.bucket_mb), "--cases", *args.cases]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict]) -> None:
    print(f"{'case':<12} {'rate':>8} {'T_on s':>7} {'T_off s':>8} {'on/off':>7} {'T_comm s':>9} {'T_compute s':>12} "
          f"{'hidden':>7} {'goal':>5} {'waits on/off s':>15} {'by waits':>9} {'compute on/off':>15}")
    for case in [c for c in CASES if c != "pp"]:
        for rate, res in results.items():
            if case not in res:
                continue
            r = res[case]
            hideable = min(r["comm"], r["compute"])
            hidden, by_waits = (r["off"] - r["on"]) / hideable, (r["exposed_off"] - r["exposed_on"]) / hideable
            waits = f"{r['exposed_on']:.3f}/{r['exposed_off']:.3f}"
            print(f"{case:<12} {rate:>8} {r['on']:>7.3f} {r['off']:>8.3f} {r['on'] / r['off']:>7.2f} {r['comm']:>9.3f} "
                  f"{r['compute']:>12.3f} {hidden:>7.2f} {GOALS[case]:>5.1f} {waits:>15} {by_waits:>9.2f} "
                  f"{r['compute_on'] / r['compute']:>15.2f}")
    pp = {rate: res["pp"] for rate, res in results.items() if "pp" in res}
    if pp:
        bubble = pp.get("off", {}).get("idle")
        print("\npp=2, 1F1B, 8 micro-batches: per step, the time stage 0 waits on receives (its bubble at rate off, "
              "plus what transfers expose)")
        print(f"{'rate':>8} {'step s':>7} {'busy s':>7} {'idle s':>7} {'transfers alone s':>18} {'exposed s':>10} "
              f"{'exposed / transfers':>20}")
        for rate, r in pp.items():
            exposed = r["idle"] - bubble if bubble is not None else float("nan")
            print(f"{rate:>8} {r['step']:>7.3f} {r['busy']:>7.3f} {r['idle']:>7.3f} {r['comm']:>18.3f} "
                  f"{exposed:>10.3f} {exposed / r['comm']:>20.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", nargs="+", default=["off", "1gbit", "200mbit"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--inner", action="store_true", help="measure here (already inside slow-net) and print JSON")
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(_measure(args.cases, args.rounds, args.bucket_mb)))
        return
    print(f"dp, zero, pp: LLaMA dim={CFG.dim} layers={CFG.n_layers} ({CFG.num_params() / 1e6:.1f}M params), batch "
          f"{BATCH}x{SEQ} per rank, buckets of {args.bucket_mb} MB; tp, sp: dim={CFG_TP.dim} layers={CFG_TP.n_layers}, "
          f"batch {BATCH_TP}x{SEQ}; 2 ranks (1 thread each), gloo, fp32, median of {args.rounds} rounds")
    results = {}
    for rate in args.rates:
        results[rate] = _under(rate, args)
        print(f"  measured at {rate}", file=sys.stderr, flush=True)
    report(results)


if __name__ == "__main__":
    main()
