"""Peak memory of a conversion against the size of the model: one tensor at a time, not the model.

    python -m benchmarks.convert_memory [--dim 1024 --layers 8]

Writes a random fp32 Hugging Face checkpoint (about 690 MB by default), then converts it
hf → native and native → hf in fresh processes, reporting each one's peak resident memory
above the resident memory of a process that only imports the converter.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llama.config import LlamaConfig
from llama.formats import hf_config, native_names, to_hf_name
from parallel.tensor_files import StreamingSafetensorsWriter

# VmHWM, not ru_maxrss: the latter survives exec, so a child would report its parent's peak
PROBE = """
import sys
from llama.convert import convert
if len(sys.argv) > 1:
    convert(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def _peak(*args) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128, vocab_size=32000)
    names = native_names(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        hf.mkdir()
        writer = StreamingSafetensorsWriter(hf / "model.safetensors",
                                            [(to_hf_name(n), torch.float32, s) for n, s in names])
        for n, s in names:
            writer.write(to_hf_name(n), torch.randn(s))
        writer.close()
        (hf / "config.json").write_text(json.dumps(hf_config(cfg)))
        model_mb = cfg.num_params() * 4 / 2**20
        largest_mb = max(torch.Size(s).numel() for _, s in names) * 4 / 2**20
        layer_mb = (4 * cfg.dim ** 2 + 3 * cfg.dim * cfg.ffn_dim) * 4 / 2**20
        base = _peak()
        print(f"model {cfg.num_params() / 1e6:.0f}M parameters = {model_mb:.0f} MiB fp32; largest tensor "
              f"{largest_mb:.0f} MiB; one layer {layer_mb:.0f} MiB; baseline process {base / 2**20:.0f} MiB")
        print(f"{'conversion':>16} {'peak above baseline (MiB)':>26} {'÷ model size':>13}")
        for src, dst in (("hf", "native"), ("native", "hf")):
            peak = _peak(src, str(Path(tmp) / src), dst, str(Path(tmp) / (dst if dst == "native" else "hf-out"))) - base
            print(f"{src + ' → ' + dst:>16} {peak / 2**20:>26.0f} {peak / 2**20 / model_mb:>13.2f}")


if __name__ == "__main__":
    main()
