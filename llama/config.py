"""Model and training configuration: the numbers of the LLaMA paper (Table 2, section 2.3).

A YAML file has two sections, `model` and `train`; presets live in `configs/` and are named
by file stem (`llama-7b`, `tiny`). Every check fails with one line naming the value and the rule.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llama import fault_drill

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the value and the rule."""


class _Loader(yaml.SafeLoader):
    """PyYAML's YAML 1.1 reads `1e-3` and `1.0e5` as strings (its floats need a dot and a signed
    exponent); these read them as numbers, as YAML 1.2 and everyone's intuition do."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def parse_yaml(text: str, where: str):
    """`text` as YAML (exponent floats included); an error names `where` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        line = f" (line {err.problem_mark.line + 1})" if err.problem_mark else ""
        raise ConfigError(f"{where} is not valid YAML{line}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from None


def _positive(obj, *names: str, integer: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        kinds = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a positive {'integer' if integer else 'number'}")


def ffn_hidden_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """The paper's SwiGLU width: 2/3 of 4·dim, rounded *up* to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:  # Meta's later releases (LLaMA 2 70B, LLaMA 3) scale it
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


ROPE_SCALING_TYPES = ("llama3",)
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}  # LLaMA 3.1's, as Meta's code fixes them


def rope_scaling(value) -> dict | None:
    """A RoPE scaling as we keep it: None, or LLaMA 3.1's {"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, its missing
    values LLaMA 3.1's. Accepts Hugging Face's spellings ("type" for "rope_type"; "default" and
    None for no scaling, extra keys like its "rope_theta" ignored); anything else is one line."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"rope_scaling={value!r} must be a mapping like {LLAMA3_ROPE_SCALING}")
    kind = value.get("rope_type", value.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported; known: {list(ROPE_SCALING_TYPES)} "
                          "(LLaMA 3.1's frequency scaling)")
    out = {k: value.get(k, default) for k, default in LLAMA3_ROPE_SCALING.items()}
    out["rope_type"] = kind
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if isinstance(out[k], bool) or not isinstance(out[k], (int, float)) or out[k] <= 0:
            raise ConfigError(f"rope_scaling {k}={out[k]!r} must be a positive number")
    if out["low_freq_factor"] >= out["high_freq_factor"]:
        raise ConfigError(f"rope_scaling low_freq_factor={out['low_freq_factor']} must be below "
                          f"high_freq_factor={out['high_freq_factor']}")
    return out


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention (LLaMA 2 70B, LLaMA 3); None: n_heads
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden: int | None = None  # an explicit FFN width (converted models); None: the paper's rule
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # LLaMA 3.1's frequency scaling: {"rope_type": "llama3", "factor": 8, ...}
    tie_word_embeddings: bool = False  # the output head is the embedding (LLaMA 3.2 1B and 3B)

    def __post_init__(self) -> None:
        _positive(self, "dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len", integer=True)
        _positive(self, "norm_eps", "rope_theta")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        if self.ffn_dim_multiplier is not None:
            _positive(self, "ffn_dim_multiplier")
        if self.n_kv_heads is not None:
            _positive(self, "n_kv_heads", integer=True)
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}: each kv head "
                                  "serves an equal group of query heads")
        if self.ffn_hidden is not None:
            _positive(self, "ffn_hidden", integer=True)
        self.rope_scaling = rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def kv_dim(self) -> int:
        """Rows of wk and wv: kv heads × head_dim (dim without grouped-query attention)."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def key(self) -> tuple:
        """Every field, hashable (rope_scaling's mapping as sorted pairs): a cache key, and the
        arguments `from_key` rebuilds the config from."""
        return tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in dataclasses.astuple(self))

    @classmethod
    def from_key(cls, key: tuple) -> LlamaConfig:
        return cls(*(dict(v) if isinstance(v, tuple) else v for v in key))

    def num_params(self) -> int:
        """Parameter count from the shapes alone (no biases; the output head counted unless tied)."""
        per_layer = 2 * self.dim * (self.dim + self.kv_dim) + 3 * self.dim * self.ffn_dim + 2 * self.dim
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.dim
        return embeddings + self.n_layers * per_layer + self.dim


# what a checkpoint's tensor shapes do not show, and a model loading it must agree on
UNSEEN_IN_SHAPES = ("rope_theta", "rope_scaling", "norm_eps", "tie_word_embeddings")


def unseen_differences(saved: dict, cfg: LlamaConfig) -> list[str]:
    """'name: saved → ours' for each UNSEEN_IN_SHAPES field where a checkpoint's model config
    (its meta.json; a missing field is the default, as older checkpoints lack the newer ones)
    differs from `cfg`."""
    fields = {f.name: f.default for f in dataclasses.fields(LlamaConfig)}
    out = []
    for name in UNSEEN_IN_SHAPES:
        theirs = saved.get(name, fields[name])
        if name == "rope_scaling":
            theirs = rope_scaling(theirs)
        if theirs != getattr(cfg, name):
            out.append(f"{name}: {theirs!r} in the checkpoint, {getattr(cfg, name)!r} in the config")
    return out


@dataclass
class TrainConfig:
    """Optimisation (paper section 2.3) and the run's size. Batch sizes count sequences."""
    lr: float = 3.0e-4
    min_lr_ratio: float = 0.1        # cosine decays to 10% of the peak
    warmup_steps: int = 2000
    steps: int = 250_000
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seq_len: int = 2048
    global_batch: int = 2048         # 2048 × 2048 tokens = 4M tokens, Table 2
    micro_batch: int = 1
    total_tokens: float = 1.0e12     # Table 2: 1.0T (7B, 13B), 1.4T (33B, 65B)
    seed: int = 1234
    dtype: str = "bf16"
    attention: str = "auto"
    recompute: str = "selective"
    log_every: int = 1
    # layout: world = tp × pp × dp (dp 0: inferred from the world size)
    tp: int = 1
    pp: int = 1
    dp: int = 0
    sp: bool = False
    sp_keep_gathered: bool = False   # sp: keep column layers' gathered input (faster, more memory)
    schedule: str = "1f1b"
    vpp: int = 1
    stage_layers: list | None = None  # an uneven split: layers per (virtual) stage, e.g. [16, 16, 16, 12]
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = False  # distributed optimizer: the next forward waits per bucket (Megatron's)
    bucket_mb: float = 25.0
    vocab_pad_multiple: int = 1
    peak_tflops: float = 0.0         # per device, for MFU; 0: known GPUs only
    inject_fault: str = ""           # a fault drill, KIND@RANK:STEP (llama/fault_drill.py)
    # validation (llama/validation.py): the first eval_iters global batches of a held-out token shard
    eval_data: str = ""              # the shard's PREFIX (.bin/.idx); "": no validation
    eval_every: int = 0              # every N steps, and after the last; 0: after the last only
    eval_iters: int = 10

    def __post_init__(self) -> None:
        _positive(self, "steps", "seq_len", "global_batch", "micro_batch", "log_every", integer=True)
        _positive(self, "lr", "min_lr_ratio", "beta1", "beta2", "grad_clip")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} and weight_decay={self.weight_decay} "
                              "must be >= 0")
        if not self.beta1 < 1 or not self.beta2 < 1:
            raise ConfigError(f"beta1={self.beta1}, beta2={self.beta2} must be < 1")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dtype={self.dtype!r} must be one of fp32, bf16")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"recompute={self.recompute!r} must be one of none, selective, full")
        _positive(self, "tp", "pp", "vpp", "vocab_pad_multiple", integer=True)
        if self.dp < 0:
            raise ConfigError(f"dp={self.dp} must be >= 0 (0: inferred from the world size)")
        try:
            fault_drill.parse(self.inject_fault)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.schedule not in ("gpipe", "1f1b", "interleaved"):
            raise ConfigError(f"schedule={self.schedule!r} must be one of gpipe, 1f1b, interleaved")
        _positive(self, "eval_iters", integer=True)
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every!r} must be an integer >= 0 (0: validate after the last "
                              "step only)")
        if self.eval_every and not self.eval_data:
            raise ConfigError(f"eval_every={self.eval_every} needs eval_data, a held-out token shard "
                              "(--eval-data PATH)")


@dataclass
class DataConfig:
    """Token shards and their sampling weights; without sources the trainer falls back to the
    bytes of the standard library's docstrings (no tokenizer needed)."""
    tokenizer: str = ""
    sources: list = field(default_factory=list)  # [{"path": "data/demo/prose", "weight": 0.7}, ...]

    def __post_init__(self) -> None:
        for src in self.sources:
            if not isinstance(src, dict) or "path" not in src or set(src) - {"path", "weight"}:
                raise ConfigError(f"data source {src!r} must be a mapping with 'path' and optional 'weight'")
            if float(src.get("weight", 1.0)) <= 0:
                raise ConfigError(f"data source {src['path']!r} has weight {src['weight']}; weights must be > 0")


@dataclass
class RunConfig:
    model: LlamaConfig = field(default_factory=LlamaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _build(cls, values: dict, section: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section '{section}'; known: {sorted(known)}")
    return cls(**values)


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a preset in configs/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; choose one of {presets()} or a .yaml path")
    return preset


def load_config(name_or_path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a preset or YAML file; `overrides` is {"model": {...}, "train": {...}, "data": {...}}."""
    path = resolve_config_path(name_or_path)
    raw = parse_yaml(path.read_text(), f"config file {str(path)!r}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping with 'model', 'train' and 'data' sections")
    for section, values in (overrides or {}).items():
        raw[section] = {**(raw.get(section) or {}), **values}
    unknown = sorted(set(raw) - {"model", "train", "data"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; a config has 'model', 'train' and 'data'")
    return RunConfig(model=_build(LlamaConfig, raw.get("model") or {}, "model"),
                     train=_build(TrainConfig, raw.get("train") or {}, "train"),
                     data=_build(DataConfig, raw.get("data") or {}, "data"))
