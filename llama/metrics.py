"""What a training step reports: model FLOPs utilisation, memory, and the JSON line per step.

MFU = (6·N + 12·L·s·d) · tokens/s ÷ (peak FLOP/s × processes): 6N for the matmuls of forward
and backward, 12·L·s·d for the attention scores and their weighted sum (Narayanan et al. 2021;
PaLM appendix B). The LLaMA paper's 65B run: 380 tokens/s/GPU on A100s, about 49.6% by this formula.
"""
from __future__ import annotations

import json
import resource
import sys

import torch

from llama.config import LlamaConfig

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, SXM parts)
KNOWN_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0,
                     "B200": 2250.0}


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    return 6.0 * cfg.num_params() + 12.0 * cfg.n_layers * seq_len * cfg.dim


def device_peak_tflops() -> float | None:
    """The bf16 peak of the visible GPU when we know it; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)


def mfu(cfg: LlamaConfig, seq_len: int, tokens_per_s: float, processes: int, peak_tflops: float | None):
    if not peak_tflops:
        return None
    return flops_per_token(cfg, seq_len) * tokens_per_s / (peak_tflops * 1e12 * processes)


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated, or on CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class MetricsWriter:
    """One JSON object per line; opened by rank 0 only (appending when a run resumes). `loggers`
    (llama.loggers: TensorBoard, W&B) receive every record too."""

    def __init__(self, path, append: bool = False, loggers=()):
        self.file = open(path, "a" if append else "w") if path else None
        self.loggers = list(loggers)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for logger in self.loggers:
            logger.write(record)

    def close(self) -> None:
        if self.file:
            self.file.close()
        for logger in self.loggers:
            logger.close()
