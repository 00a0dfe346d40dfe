"""`llama-eval --harness TASKS`: EleutherAI's lm-evaluation-harness (`lm-eval`) on a checkpoint
of any format, through its `hf` model (transformers' LlamaForCausalLM), in this process.

A Hugging Face export with its tokenizer files (`llama-convert --to hf --tokenizer`) is
evaluated as it is; one without is given `--tokenizer`, written as Hugging Face's files to a
temporary directory; a native or Meta checkpoint is converted first, with `--tokenizer`, to a
temporary Hugging Face directory (the weights once more on disk, one tensor at a time).
Needs the `eval` extra: `pip install -e ".[eval]"` (lm-eval and accelerate).
"""
from __future__ import annotations

import fnmatch
import json
import math
import tempfile
from pathlib import Path

from llama import cli
from llama.inputs import InputError

EXTRA = 'pip install -e ".[eval]"  (or: pip install "lm-eval>=0.4" "accelerate>=0.26")'


def require_lm_eval():
    """lm_eval, or one line naming the extra to install."""
    missing = []
    for module in ("lm_eval", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.replace("_", "-"))
    if missing:
        raise InputError(f"--harness needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed: {EXTRA}")
    import lm_eval
    return lm_eval


def parse_model_args(text: str | None) -> dict:
    """`k=v,k=v` as lm-eval writes model arguments; values as strings, which lm-eval converts."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--harness-model-args: {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def check_inputs(checkpoint, fmt: str, tokenizer, include=()) -> None:
    """What lm-eval will need, checked before anything slow: the local task paths, and a
    tokenizer, beside an HF export or given."""
    for path in include:
        if not Path(path).exists():
            raise InputError(f"--harness-include {str(path)!r} does not exist")
    if tokenizer is not None or (fmt == "hf" and (Path(checkpoint) / "tokenizer.json").is_file()):
        return
    if fmt == "hf":
        raise InputError(f"{checkpoint} has no tokenizer.json: give --tokenizer tokenizer.model, or export with "
                         "llama-convert --to hf --tokenizer tokenizer.model")
    raise InputError(f"--harness on a {fmt} checkpoint needs --tokenizer (the SentencePiece model), to write "
                     "beside its Hugging Face conversion")


def prepare(checkpoint, fmt: str, tokenizer, workdir: Path) -> dict:
    """lm-eval's `hf` model arguments for the checkpoint: `pretrained` (a Hugging Face
    directory) and, where the tokenizer is not beside the weights, `tokenizer`."""
    from llama.convert import convert
    from llama.hf_tokenizer import check_tokenizer, write_hf_tokenizer
    checkpoint = Path(checkpoint)
    if fmt == "hf":
        if (checkpoint / "tokenizer.json").is_file():  # the export as it is
            own = checkpoint / "tokenizer.model"
            if tokenizer is not None and own.is_file() and own.read_bytes() != Path(tokenizer).read_bytes():
                cli.warn("llama-eval", f"--harness uses {checkpoint}'s own tokenizer.json, not --tokenizer {tokenizer}")
            return {"pretrained": str(checkpoint)}
        from llama.convert import hf_model_config
        cfg = hf_model_config(checkpoint)  # config.json only: no weight file is opened
        write_hf_tokenizer(check_tokenizer(tokenizer, cfg.vocab_size), workdir / "tokenizer", cfg.max_seq_len)
        return {"pretrained": str(checkpoint), "tokenizer": str(workdir / "tokenizer")}
    convert(fmt, checkpoint, "hf", workdir / "hf", tokenizer=tokenizer)
    return {"pretrained": str(workdir / "hf")}


def _metrics(task_results: dict) -> dict:
    """lm-eval's `acc,none` keys as `acc` (other filters keep their suffix), numbers only."""
    out = {}
    for key, value in task_results.items():
        if key in ("alias", "name") or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt in ("", "none") else key
        out[name] = None if isinstance(value, float) and math.isnan(value) else value
    return out


def _loglikelihood(response):
    """A loglikelihood response, (ll, is_greedy), as a float (resps nest it in one more list)."""
    while isinstance(response, (list, tuple)) and response and isinstance(response[0], (list, tuple)):
        response = response[0]
    if isinstance(response, (list, tuple)) and response and isinstance(response[0], (int, float)):
        return float(response[0])
    return None


def sample_records(samples: dict) -> list[dict]:
    """lm-eval's logged samples, one record per item: its document, the (context,
    continuation) pairs it scored, their log-likelihoods (loglikelihood and multiple-choice
    tasks), and its metrics."""
    records = []
    for task, items in samples.items():
        for s in items:
            responses = s.get("filtered_resps", s.get("resps", []))
            lls = [_loglikelihood(r) for r in responses]
            record = {"task": task, "doc_id": s["doc_id"], "doc": s["doc"], "target": s.get("target"),
                      "arguments": [list(a) if isinstance(a, (list, tuple)) else a for a in s.get("arguments", [])]}
            record |= {"loglikelihoods": lls} if lls and None not in lls else {"responses": responses}
            metrics = s.get("metrics") or [k for k, v in s.items() if isinstance(v, (int, float)) and k != "doc_id"]
            records.append(record | {m: s[m] for m in metrics if m in s})
    return records


def task_manager(TaskManager, tasks: list[str], include: list[str]):
    """lm-eval's TaskManager and the tasks resolved in it. Indexing lm-eval's own tasks takes
    about 10 s: when the local ones (--harness-include) hold every task asked for, it is skipped."""
    if include:
        try:
            local = TaskManager(include_path=include, include_defaults=False)
        except TypeError:  # an lm-eval without include_defaults
            local = None
        if local is not None:
            try:
                return local, resolve_tasks(local, tasks, include)
            except InputError:
                pass
    manager = TaskManager(include_path=include or None)
    return manager, resolve_tasks(manager, tasks, include)


def resolve_tasks(manager, tasks: list[str], include: list[str]) -> list[str]:
    """Task, group and tag names (globs expanded) and YAML paths, or one line naming the unknown."""
    known = list(getattr(manager, "all_tasks", []))
    out, unknown = [], []
    for name in tasks:
        matched = [name] if name in known or Path(name).is_file() else fnmatch.filter(known, name)
        if matched:
            out.extend(matched)
        else:
            unknown.append(name)
    if unknown:
        where = f"lm-eval's tasks nor in {', '.join(include)}" if include else \
            "lm-eval's tasks (local task YAMLs: --harness-include DIR)"
        raise InputError(f"--harness: {', '.join(map(repr, unknown))} is none of {where}")
    return out


def evaluate(checkpoint, fmt: str, tasks: list[str], tokenizer=None, include=(), shots: int | None = None,
             limit: int | None = None, model_args: str | None = None, samples_path=None) -> dict:
    """lm-eval's results per task ({task: {metric: value}}); with samples_path, every item's
    log-likelihoods as JSONL."""
    lm_eval = require_lm_eval()
    import torch
    from lm_eval.tasks import TaskManager
    include = [str(p) for p in include]
    check_inputs(checkpoint, fmt, tokenizer, include)
    with tempfile.TemporaryDirectory(prefix="llama-harness-") as tmp:
        args = {"dtype": "float32", "device": "cuda" if torch.cuda.is_available() else "cpu"}
        args |= prepare(checkpoint, fmt, tokenizer, Path(tmp)) | parse_model_args(model_args)
        manager, tasks = task_manager(TaskManager, tasks, include)
        out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=tasks, num_fewshot=shots, limit=limit,
                                      task_manager=manager, log_samples=samples_path is not None)
    if samples_path is not None:
        path = Path(samples_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for record in sample_records(out.get("samples", {})):
                f.write(json.dumps(record, default=str) + "\n")
    return {task: _metrics(values) for task, values in out["results"].items()}
