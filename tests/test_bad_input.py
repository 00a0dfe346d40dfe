"""Every command answers bad input with one line on stderr, `PROG: error: ...` naming the value or
file, and exit code 2: never a traceback. One table, one row per (command, bad input); commands
run in-process (their main(argv)), and a few rows again as real processes."""
import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import convert_cli, evaluate, generate, train
from llama.cli import HelpFormatter
from llama.config import LlamaConfig, load_config
from llama.model import check_tensor_parallel
from tests.damage import flip_piece

ROOT = Path(__file__).resolve().parents[1]
CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=600, multiple_of=16, max_seq_len=64)


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOLS = {name: _tool(name) for name in ("preprocess_data", "train_tokenizer", "build_demo_corpus", "plot_metrics")}
COMMANDS = {"llama-generate": generate, "llama-eval": evaluate, "llama-convert": convert_cli, "llama-train": train,
            **{f"{name}.py": module for name, module in TOOLS.items()}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint and tokenizer, and broken copies of everything a command reads."""
    from llama.demo_corpus import prose_text
    from llama.parallelize import build_chunks
    from llama.tokenizer import train_tokenizer
    from parallel.checkpoint import save_checkpoint
    from parallel.topology import build_topology
    d = tmp_path_factory.mktemp("bad_input")
    tok = train_tokenizer(prose_text(max_bytes=60_000).split("\n\n"), d / "tok", vocab_size=CFG.vocab_size)
    topo = build_topology()
    save_checkpoint(d / "ckpt", 1, build_chunks(CFG, topo, seed=0), None, topo,
                    meta={"consumed_samples": 0, "config": {"model": CFG.__dict__}})
    weights = next((d / "ckpt").glob("step_*/shards/rank00000.safetensors"))
    for name, damage in (("truncated", lambda b: b[:len(b) // 2]), ("garbage", lambda b: b"\x07garbage" * 50)):
        shutil.copytree(d / "ckpt", d / f"{name}-ckpt")
        target = d / f"{name}-ckpt" / weights.relative_to(d / "ckpt")
        target.write_bytes(damage(target.read_bytes()))
    (d / "truncated.model").write_bytes(tok.read_bytes()[:200])
    (d / "garbage.model").write_text("not a tokenizer\n")
    (d / "empty.txt").write_text("")
    (d / "empty.jsonl").write_text("\n")
    (d / "bad.jsonl").write_text('{"text": "fine", "context": "a", "answers": ["b"]}\n{"text": \n')
    (d / "nokey.jsonl").write_text('{"body": "text under another key"}\n')
    (d / "badanswer.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "answer": 5}\n')
    (d / "mc.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "answer": 0}\n')
    (d / "metrics.jsonl").write_text('{"step": 0, "lr": 0.1}\n')
    (d / "tiny.txt").write_text("a few words of text")
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text('{\n  "hidden_size": 32,\n  oops\n}\n')
    (d / "hf-nokey").mkdir()
    (d / "hf-nokey" / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (d / "meta").mkdir()
    torch.save({"tok_embeddings.weight": torch.zeros(8, 4)}, d / "meta" / "consolidated.00.pth")
    (d / "meta" / "params.json").write_text('{"dim": 32,')
    (d / "broken.yaml").write_text("train:\n  lr: [1,\n")
    for name in ("flipped", "newer", "missing"):  # a damaged tensor, a future format, a deleted file
        shutil.copytree(weights.parents[1], d / f"{name}-ckpt")
    flip_piece(d / "flipped-ckpt", "layers.1.feed_forward.w2.weight")
    meta = json.loads((d / "newer-ckpt" / "meta.json").read_text())
    (d / "newer-ckpt" / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    (d / "missing-ckpt" / "shards" / "rank00000.safetensors").unlink()
    return {"d": str(d), "tok": str(tok), "ckpt": str(d / "ckpt"), "long": "word " * 100}


@pytest.fixture(scope="module", autouse=True)
def short_demo_corpus():
    """llama-train's byte-level demo corpus cut to 40 kB for the rows that train (the default 600 kB
    takes seconds to build a run)."""
    from llama.demo_corpus import prose_text
    text = prose_text(max_bytes=40_000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "prose_text", lambda max_bytes: text)
        yield


def T(*args):  # llama-train with the model of the good checkpoint, on byte-level demo data, plus args
    return ["--no-progress", "--steps", "1", "--set", "model.dim=32", "--set", "model.n_layers=2",
            "--set", "model.n_heads=4", "--set", "model.vocab_size=600", "--set", "model.multiple_of=16",
            "--set", "model.max_seq_len=64", "--set", "data.sources=[]", "--set", "data.tokenizer=''",
            "--set", "train.seq_len=32", "--set", "train.global_batch=2", "--set", "train.micro_batch=1", *args]


CHECKSUM = "rank00000.safetensors': tensor 'layers.1.feed_forward.w2.weight@tp0/0-"
NEWER = "format version 99 is newer than this code reads (versions 1 to 3)"


def G(*args):  # llama-generate on the good checkpoint and tokenizer, plus args
    return ["--checkpoint", "{ckpt}", "--tokenizer", "{tok}", "--prompt", "hello", *args]


def E(*args):  # llama-eval on the good checkpoint, plus args
    return ["--checkpoint", "{ckpt}", *args]


def C(src, path, *args):  # llama-convert from `src` at `path` to native
    return ["--from", src, "--to", "native", "--input", path, "--output", "{d}/out-convert", *args]


# (command, argv, what the one line must contain); {d} is the folder of broken files
CASES = [
    ("llama-generate", ["--checkpoint", "{d}/truncated-ckpt", "--tokenizer", "{tok}", "--prompt", "hi"],
     "rank00000.safetensors' is truncated"),
    ("llama-generate", ["--checkpoint", "{d}/garbage-ckpt", "--tokenizer", "{tok}", "--prompt", "hi"],
     "rank00000.safetensors' is truncated or corrupted"),
    ("llama-generate", ["--checkpoint", "{d}/nowhere", "--tokenizer", "{tok}", "--prompt", "hi"], "nowhere"),
    ("llama-generate", ["--checkpoint", "{ckpt}", "--tokenizer", "{d}/garbage.model", "--prompt", "hi"],
     "garbage.model' is not a SentencePiece model"),
    ("llama-generate", ["--checkpoint", "{ckpt}", "--tokenizer", "{d}/truncated.model", "--prompt", "hi"],
     "truncated.model' is not a SentencePiece model"),
    ("llama-generate", ["--checkpoint", "{ckpt}", "--tokenizer", "{d}", "--prompt", "hi"], "is a directory"),
    ("llama-generate", ["--checkpoint", "{ckpt}", "--tokenizer", "{tok}", "--prompt", "{long}"],
     "model.max_seq_len=64 allows at most 63"),
    ("llama-generate", G("--temperature", "-1"), "temperature=-1.0 must be >= 0"),
    ("llama-generate", G("--top-p", "0"), "top_p=0.0 must be in (0, 1]"),
    ("llama-generate", G("--top-p", "1.5"), "top_p=1.5"),
    ("llama-generate", G("--max-new-tokens", "0"), "--max-new-tokens: 0 must be >= 1"),
    ("llama-generate", ["--checkpoint", "{ckpt}", "--prompt", "hi"], "required: --tokenizer"),
    ("llama-eval", E(), "nothing to evaluate: give --perplexity SHARD and/or --task"),
    ("llama-eval", E("--tokenizer", "{tok}", "--task", "tasks/piqa.jsonl"), "'tasks/piqa.jsonl' does not exist"),
    ("llama-eval", E("--tokenizer", "{tok}", "--task", "{d}/empty.jsonl"), "empty.jsonl' has no examples"),
    ("llama-eval", E("--tokenizer", "{tok}", "--task", "{d}/bad.jsonl"), "bad.jsonl:2: not valid JSON"),
    ("llama-eval", E("--tokenizer", "{tok}", "--task", "{d}/badanswer.jsonl"),
     "badanswer.jsonl:1: 'answer' must index 'choices' (0 to 1), not 5"),
    ("llama-eval", E("--task", "{d}/mc.jsonl"), "--task needs --tokenizer"),
    ("llama-eval", ["--checkpoint", "{d}/truncated-ckpt", "--tokenizer", "{tok}", "--task", "{d}/mc.jsonl"],
     "rank00000.safetensors' is truncated"),
    ("llama-eval", E("--tokenizer", "{d}/garbage.model", "--task", "{d}/mc.jsonl"), "garbage.model"),
    ("llama-eval", E("--perplexity", "{d}/no-shard", "--seq-len", "32"), "no-shard"),
    ("llama-eval", E("--perplexity", "{d}/no-shard", "--seq-len", "100"), "seq_len=100 exceeds"),
    ("llama-convert", C("hf", "{d}/hf"), "config.json:3: Hugging Face config is not valid JSON"),
    ("llama-convert", C("hf", "{d}/hf-nokey"), "config.json: no 'num_attention_heads' key"),
    ("llama-convert", C("meta", "{d}/meta"), "params.json:1: Meta's params.json is not valid JSON"),
    ("llama-convert", C("native", "{d}/nowhere"), "nowhere"),
    ("llama-convert", C("native", "{ckpt}", "--tp", "0"), "--tp: 0 must be >= 1"),
    ("preprocess_data.py", ["--input", "{d}/tiny.txt", "--tokenizer", "/no/such", "--output-prefix", "{d}/s"],
     "tokenizer model '/no/such' does not exist"),
    ("preprocess_data.py", ["--input", "{d}/empty.txt", "--tokenizer", "{tok}", "--output-prefix", "{d}/s"],
     "empty.txt': the files are empty"),
    ("preprocess_data.py", ["--input", "{d}/bad.jsonl", "--tokenizer", "{tok}", "--output-prefix", "{d}/s"],
     "bad.jsonl:2: not valid JSON"),
    ("preprocess_data.py", ["--input", "{d}/nokey.jsonl", "--tokenizer", "{tok}", "--output-prefix", "{d}/s"],
     "nokey.jsonl:1: no text under key 'text'"),
    ("preprocess_data.py", ["--input", "{d}", "--tokenizer", "{tok}", "--output-prefix", "{d}/s"], "is a directory"),
    ("train_tokenizer.py", ["--input", "{d}/empty.txt", "--model-prefix", "{d}/t"], "empty.txt': the files are empty"),
    ("train_tokenizer.py", ["--input", "{d}", "--model-prefix", "{d}/t"], "is a directory, not a file"),
    ("train_tokenizer.py", ["--input", "{d}/bad.jsonl", "--model-prefix", "{d}/t"], "bad.jsonl:2: not valid JSON"),
    ("train_tokenizer.py", ["--input", "{d}/tiny.txt", "--model-prefix", "{d}/t", "--vocab-size", "5000"],
     "vocab_size=5000"),
    ("build_demo_corpus.py", ["--out", "{d}/demo", "--max-mb", "0"], "--max-mb 0.0 must be > 0"),
    ("build_demo_corpus.py", ["--out", "{d}/demo", "--vocab-size", "x"], "--vocab-size: 'x' is not an integer"),
    ("plot_metrics.py", ["{d}/nowhere.jsonl", "--out", "{d}/p.png"], "nowhere.jsonl' does not exist"),
    ("plot_metrics.py", ["{d}/metrics.jsonl", "--out", "{d}/p.png"], "metrics.jsonl:1: no number under ['loss']"),
    ("plot_metrics.py", ["{d}/empty.jsonl", "--out", "{d}/p.png"], "empty.jsonl' has no records"),
    ("llama-train", ["--set", "train.lr=abc"], "lr='abc' must be a positive number"),
    ("llama-train", ["--set", "train.lr=[1,"], "--set 'train.lr=[1,' is not valid YAML"),
    ("llama-train", ["--config", "{d}/broken.yaml"], "broken.yaml' is not valid YAML (line 3)"),
    ("llama-train", ["--config", "{d}/none.yaml"], "none.yaml' does not exist"),
    ("llama-train", ["--config", "llama-65b", "--tp", "8", "--pp", "3", "--dry-run", "--world-size", "2048"],
     "world size 2048 is not divisible by tp*pp=8*3"),
    ("llama-train", ["--tp", "8", "--dry-run", "--world-size", "8"], "n_heads=4 is not divisible by tp=8"),
    ("llama-train", ["--set", "model.dim=96", "--set", "model.n_heads=12", "--set", "model.n_kv_heads=4", "--set",
                     "model.ffn_hidden=96", "--tp", "6", "--dry-run", "--world-size", "6"],
     "tp=6 neither divides n_kv_heads=4 nor is a multiple of it"),
    ("llama-train", ["--set", "model.rope_scaling={{rope_type: yarn, factor: 4}}", "--dry-run", "--world-size", "1"],
     "rope_scaling type 'yarn' is not supported; known: ['llama3']"),
    ("llama-train", ["--dry-run", "--world-size", "0"], "argument --world-size: 0 must be >= 1"),
    # damaged checkpoints (issue 17): the file and the tensor named, by every command that reads one
    ("llama-generate", ["--checkpoint", "{d}/flipped-ckpt", "--tokenizer", "{tok}", "--prompt", "hi"], CHECKSUM),
    ("llama-eval", ["--checkpoint", "{d}/flipped-ckpt", "--tokenizer", "{tok}", "--task", "{d}/mc.jsonl"], CHECKSUM),
    ("llama-convert", C("native", "{d}/flipped-ckpt"), CHECKSUM),
    ("llama-train", T("--init-from", "{d}/flipped-ckpt"), CHECKSUM),
    ("llama-train", T("--resume", "{ckpt}"), "has no optimizer state (saved without an optimizer, or converted)"),
    ("llama-train", T("--init-from", "{ckpt}", "--set", "model.tie_word_embeddings=true"),
     "tie_word_embeddings: False in the checkpoint, True in the config"),
    ("llama-generate", ["--checkpoint", "{d}/newer-ckpt", "--tokenizer", "{tok}", "--prompt", "hi"], NEWER),
    ("llama-convert", C("native", "{d}/newer-ckpt"), NEWER),
    ("llama-train", T("--init-from", "{d}/newer-ckpt"), NEWER),
    ("llama-generate", ["--checkpoint", "{d}/missing-ckpt", "--tokenizer", "{tok}", "--prompt", "hi"],
     "shards/rank00000.safetensors' is missing"),
    ("llama-convert", C("native", "{d}/missing-ckpt"), "shards/rank00000.safetensors' is missing"),
    ("llama-generate", ["--checkpoint", "{d}/hf", "--tokenizer", "{tok}", "--prompt", "hi"],
     "hf' is not a checkpoint (no meta.json, no 'latest')"),
    ("llama-train", T("--init-from", "{d}/meta"), "meta' is not a checkpoint (no meta.json, no 'latest')"),
    ("llama-train", T("--save", "{d}/tiny.txt/ckpt"), "cannot save checkpoint step_000001 in"),
]
# rows run again as real processes (`python -m llama.X`, `python tools/X.py`): what a user sees
SUBPROCESS = [c for c in CASES if c[2] in ("rank00000.safetensors' is truncated or corrupted",
                                           "'tasks/piqa.jsonl' does not exist",
                                           "tokenizer model '/no/such' does not exist")]


def _ids(cases):
    return [f"{i}-{prog}-{want[:40]}" for i, (prog, _, want) in enumerate(cases)]


def _argv(argv, files):
    return [a.format(**files) for a in argv]


def _assert_one_line(prog: str, code, err: str, want: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith(f"{prog}: error: ") and want in lines[0], lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prog, argv, want", CASES, ids=_ids(CASES))
def test_bad_input_is_one_line_and_exit_code_2(prog, argv, want, files, capsys):
    try:
        code = COMMANDS[prog].main(_argv(argv, files))
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    _assert_one_line(prog, code, capsys.readouterr().err, want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prog, argv, want", SUBPROCESS, ids=_ids(SUBPROCESS))
def test_bad_input_as_a_real_process(prog, argv, want, files):
    entry = ["-m", COMMANDS[prog].__name__] if prog.startswith("llama-") else [str(ROOT / "tools" / prog)]
    proc = subprocess.run([sys.executable, *entry, *_argv(argv, files)], cwd=ROOT, capture_output=True, text=True,
                          timeout=50)
    _assert_one_line(prog, proc.returncode, proc.stderr, want)


@pytest.mark.timeout(60)
def test_preprocess_on_empty_input_writes_nothing(files, capsys):
    d = Path(files["d"])
    code = TOOLS["preprocess_data"].main(["--input", f"{d}/empty.txt", f"{d}/empty.jsonl", "--tokenizer",
                                          files["tok"], "--output-prefix", f"{d}/nothing/shard"])
    assert code == 2 and "empty.jsonl" in capsys.readouterr().err
    assert not list(d.glob("nothing/shard*"))


@pytest.mark.timeout(60)
def test_max_new_tokens_past_the_context_is_capped_with_a_warning(files, capsys):
    assert generate.main(_argv(G("--max-new-tokens", "500"), files)) == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llama-generate: warning: --max-new-tokens 500 capped to "), err
    assert "hello" in out


def test_init_from_with_another_rope_theta_warns_and_trains(files, capsys):
    """Raising rope_theta on a pretrained model is a context-extension recipe: a warning, not an
    error (a --resume with it is one, like a different tie: see CASES)."""
    assert train.main(_argv(T("--init-from", "{ckpt}", "--set", "model.rope_theta=500000.0"), files)) == 0
    err = capsys.readouterr().err
    assert "llama-train: warning: checkpoint" in err
    assert "rope_theta: 10000.0 in the checkpoint, 500000.0 in the config; training goes on" in err


def test_exponent_numbers_are_numbers_in_set_and_in_yaml(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; the README's own `--set train.lr=1e-3` must work."""
    assert train.parse_overrides(["train.lr=1e-3", "model.norm_eps=1.0E-5", "train.steps=10"]) == \
        {"train": {"lr": 0.001, "steps": 10}, "model": {"norm_eps": 1e-5}}
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-3\n  min_lr_ratio: 5e-2\n")
    run = load_config(tmp_path / "c.yaml")
    assert (run.train.lr, run.train.min_lr_ratio) == (0.001, 0.05)
    assert train.parse_overrides(["data.tokenizer=1e-3x"]) == {"data": {"tokenizer": "1e-3x"}}


def test_tp_suggestions_divide_the_heads_and_fit_the_world():
    cfg = LlamaConfig(dim=96, n_layers=1, n_heads=6, multiple_of=16)
    with pytest.raises(ValueError, match=r"n_heads=6 is not divisible by tp=4; choose tp in \[1, 2\] "):
        check_tensor_parallel(cfg, 4, ranks=4)
    with pytest.raises(ValueError, match=r"choose tp in \[1, 2, 3, 6\]$"):  # the world unknown: every divisor
        check_tensor_parallel(cfg, 4)


PARSERS = {prog: module.build_parser() for prog, module in COMMANDS.items()}


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_flag_has_help_with_its_default(prog):
    parser = PARSERS[prog]
    assert parser.description and parser.formatter_class is HelpFormatter
    formatter = parser.formatter_class(prog)
    for action in parser._actions:
        shown = formatter._get_help_string(action)
        assert action.help, f"{prog} {action.option_strings}: no help"
        if action.option_strings and not action.required and action.default is not argparse.SUPPRESS:
            assert "default" in shown, f"{prog} {action.option_strings}: no default in {shown!r}"


def test_convert_help_shows_examples():
    text = PARSERS["llama-convert"].format_help()
    for example in ("--from meta --to native", "--from hf --to native", "--from native --to hf"):
        assert f"llama-convert {example}" in text
