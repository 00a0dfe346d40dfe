"""LLaMA-65B on 2048 A100-80GB as the `llm-analysis` package (PyPI, 0.2.2) predicts it.

    pip install llm-analysis        # 0.2.2 in its own venv beside torch 2.13 (torch is left alone)
    pip install --no-deps llm-analysis==0.2.2 "fire<0.6" termcolor six   # beside our test extras
    python -m benchmarks.llm_analysis_65b

Its pins (transformers<5, huggingface-hub<0.15) cannot resolve with our `test` extra
(transformers>=4.40 needs huggingface-hub>=0.19): ResolutionImpossible. It only needs `fire`;
transformers is an optional import used to fetch configs from the Hub, which this file never does.

An estimator a user might pick instead of `llama-plan`, run on the paper's inputs: 80 layers,
dim 8192, 64 heads, FFN 22016, vocab 32000, 2048-token sequences, 2048-sequence (4M-token) batches,
1.4T tokens, bf16, a100-sxm-80gb (its table: 312 TFLOP/s 16-bit peak, 2039 GB/s HBM, 300 GB/s
NVLink, 200 GB/s inter-node), selective recompute, sequence parallelism, ZeRO-1, flash attention.
The paper reports 380 tokens/s/GPU and 21 days.

What llm-analysis models (read from its `LLMAnalysis.training`, not its docs alone):
- Step time is FLOPs only: (fwd + 2*fwd + recompute) FLOPs / (tp*pp GPUs * peak * flops_efficiency),
  times the micro-batches per step. No pipeline bubble, no pipeline p2p, no data-parallel
  all-reduce or ZeRO gather, no optimizer step, no tp/sp communication: its README says "pp and dp
  communications are ignored" and "training time only counts forward and backward". Days are
  therefore the FLOP count over (2048 * peak * flops_efficiency), independent of tp/pp/dp.
- flops_efficiency defaults to 1.0 (peak; its README calls that "the lower bound of training
  latency"); its README quotes "up to 0.5" from the literature and its own LLaMA example uses 0.5
  (with hbm_memory_efficiency 0.9), which is how that example lands near the paper's GPU-hours.
  main() prints both; 0.5 is the package authors' choice, not fitted here.
- It does compute a forward-pass breakdown (attention, MLP, layernorm, ring all-reduce tp_comm at
  the raw 300 GB/s, embedding), as max(compute, HBM traffic) per op, but that breakdown never enters
  the step time; it is returned here as `fwd_breakdown_s` for reference only.
- FLOPs: MLP fixed at 16*b*s*h^2 per layer (a 4h GELU MLP; LLaMA's SwiGLU is 16.125*b*s*h^2),
  attention 8*b*s*h^2 + 4*b*s^2*h, logits 2*b*s*h*V, backward = 2 * forward, selective recompute
  adds the 4*b*s^2*h attention-score FLOPs per layer (even with flash attention).
- Memory: Adam with fp32 master weights and two fp32 moments (12 B/param, sharded over dp under
  ZeRO-1), fp32 gradients (4 B/param, not sharded under ZeRO-1), 16-bit weights; the (tied, counted
  once) embedding sits on every pipeline stage. Activations: the Korthikanti et al. per-layer
  formula times all L layers (the first 1F1B stage holds pp micro-batches of L/pp layers), with an
  always-on attention-dropout mask, fp32 layernorm inputs, plus one micro-batch of logits. No
  allocator fragmentation, no communication buffers, no CUDA context.
- Its MLP has two matrices (h x f, f x h), so the model is given f = 1.5 * 22016 = 33024, which
  makes its parameter count match LLaMA's three h x 22016 matrices; it ties input and output
  embeddings, so it counts 65.0B parameters, not 65.3B. There is no layout search: given no
  micro-batch it picks the largest that fits (micro_batch=None here); the layout is ours to give.
"""
from __future__ import annotations

PAPER = {"tokens_per_s_per_gpu": 380.0, "days": 21.0}
GPUS, SEQ, GLOBAL_BATCH, TOKENS = 2048, 2048, 2048, 1.4e12


def llm_analysis_65b(tp=8, pp=4, dp=64, micro_batch=1, recompute="selective", sp=True, zero1=True,
                     flops_efficiency=None) -> dict:
    """llm-analysis's own prediction for the 65B run on this layout (None efficiency: its default, 1.0)."""
    try:
        from importlib.metadata import version

        from llm_analysis.analysis import ActivationRecomputation, DSZeRO, LLMAnalysis
        from llm_analysis.config import DtypeConfig, ModelConfig, ParallelismConfig, get_gpu_config_by_name
        from llm_analysis.logger import logger
    except ImportError:
        raise RuntimeError("llm-analysis is not installed: pip install --no-deps llm-analysis==0.2.2 "
                           "'fire<0.6' termcolor six") from None
    logger.setLevel("ERROR")  # it logs every formula at INFO and sanity warnings at WARNING
    f = 3 * 22016 // 2  # its MLP has 2 matrices; LLaMA's SwiGLU has 3 of h x 22016
    model = ModelConfig(name="llama-65b", num_layers=80, n_head=64, hidden_dim=8192, vocab_size=32000,
                        max_seq_len=SEQ, ffn_embed_dim=f, expansion_ratio=f / 8192, model_type="llama")
    gpu = get_gpu_config_by_name("a100-sxm-80gb")
    la = LLMAnalysis(model, gpu, DtypeConfig(name="w16a16e16"),  # bf16 counts as 16-bit: 312 TFLOP/s
                     ParallelismConfig(tp_size=tp, pp_size=pp, dp_size=dp, sp_size=tp if sp else 1),
                     flops_efficiency=flops_efficiency)
    s = la.training(batch_size_per_gpu=micro_batch, global_batch_size=GLOBAL_BATCH, seq_len=SEQ,
                    total_num_tokens=TOKENS,
                    activation_recomputation=ActivationRecomputation[recompute.upper()],
                    ds_zero=DSZeRO.STAGE_1 if zero1 else DSZeRO.NONE, flash_attn=True,
                    mlp_gated_linear_units=True)  # SwiGLU; only changes anything with mlp_recompute_gelu
    gpus = tp * pp * dp
    mb, step = s["batch_size_per_gpu"], s["latency_per_iter"]
    model_flops = 3 * la.get_num_flops_fwd_total(mb, SEQ) * s["gradient_accumulation_steps"]  # no recompute
    gib = 1024 ** 3
    return {
        "version": version("llm-analysis"),
        "layout": dict(tp=tp, pp=pp, dp=dp, micro_batch=mb, recompute=recompute, sp=sp, zero1=zero1,
                       grad_accum=s["gradient_accumulation_steps"]),
        "flops_efficiency": s["flops_efficiency"],
        "num_params": s["num_params_total"],
        "memory_gib": {
            "total": s["(weight+op_state+grad+act)_memory_per_gpu"] / gib,
            "weights": s["weight_memory_per_gpu"] / gib,
            "gradients": s["gradient_memory_per_gpu"] / gib,
            "optimizer_state": s["optimizer_state_memory_per_gpu"] / gib,
            "activations": s["activation_memory_per_gpu"] / gib,
        },
        "fits": s["memory_left_per_gpu"] >= 0,
        "max_micro_batch": s["max_batch_size_per_gpu"],
        "step_time_s": step,  # = compute only: micro-batch FLOPs / (tp*pp*peak*eff) * grad_accum
        "step_breakdown_s": {"compute": step, "tp_comm": 0.0, "pp_p2p": 0.0, "bubble": 0.0,
                             "dp_comm": 0.0, "optimizer": 0.0},  # the zeros are what it leaves out
        "fwd_breakdown_s": {k[len("latency_fwd_"):]: v for k, v in s.items() if k.startswith("latency_fwd_")},
        "tokens_per_s_per_gpu": GLOBAL_BATCH * SEQ / step / gpus,
        "mfu": model_flops / (step * tp * pp * gpu.peak_fp16_TFLOPS * 1e12),
        "days": s["total_training_latency"] / 86400,
        "gpu_hours": s["gpu_hours"],
    }


def main():
    rows = [(lay, fe, llm_analysis_65b(**lay, flops_efficiency=fe))
            for fe in (None, 0.5) for lay in (dict(tp=8, pp=4, dp=64), dict(tp=8, pp=8, dp=32))]
    print(f"llm-analysis {rows[0][2]['version']}: LLaMA-65B, {GPUS} x a100-sxm-80gb, 4M-token batches, "
          f"1.4T tokens, selective recompute + sp + ZeRO-1, micro-batch 1")
    print(f"{'layout':<13}{'flops eff':>10}{'mem GiB':>9}{'(w/g/opt/act)':>22}{'step s':>8}"
          f"{'tok/s/GPU':>11}{'MFU':>7}{'days':>7}")
    for lay, fe, r in rows:
        m = r["memory_gib"]
        name = f"tp{lay['tp']} pp{lay['pp']} dp{lay['dp']}"
        parts = f"{m['weights']:.1f}/{m['gradients']:.1f}/{m['optimizer_state']:.1f}/{m['activations']:.1f}"
        eff = f"{r['flops_efficiency']:.2f}" + ("*" if fe is None else "")
        print(f"{name:<13}{eff:>10}{m['total']:>9.1f}{parts:>22}{r['step_time_s']:>8.2f}"
              f"{r['tokens_per_s_per_gpu']:>11.0f}{r['mfu']:>7.1%}{r['days']:>7.1f}")
    print(f"{'paper':<13}{'':>10}{'':>9}{'':>22}{'':>8}{PAPER['tokens_per_s_per_gpu']:>11.0f}{'':>7}"
          f"{PAPER['days']:>7.1f}")
    print("* its default (peak FLOP/s). 0.5 is the value its README and LLaMA example use. Its step time is\n"
          "  FLOPs only (no bubble, p2p, tp/dp communication or optimizer), so it does not depend on the layout.")


if __name__ == "__main__":
    main()
