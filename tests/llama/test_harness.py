"""lm-evaluation-harness on our Hugging Face export, unchanged: on a multiple-choice task
defined in a local YAML + JSONL (no hub), `llama-eval --harness` finds llama-eval's own
log-likelihoods within 1e-4 on every choice, its accuracy (normalization `none`) as `acc`, and
with `--normalization lm-eval` its `acc_norm`; and the harness's bad inputs are one line."""
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from llama.config import LlamaConfig
from llama.convert_cli import main as convert_main
from llama.demo_corpus import prose_text
from llama.evaluate import main as eval_main
from llama.evaluate import multiple_choice
from llama.tokenizer import ByteTokenizer, Tokenizer, train_tokenizer
from tests.launcher.real_launchers import ROOT
from tests.llama.test_evaluate import TASKS, _by_hand, _random_model

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=600, multiple_of=16, max_seq_len=128)


def test_lm_eval_normalisation_divides_by_the_length_without_the_leading_space():
    model = _random_model()
    result = multiple_choice(model, ByteTokenizer(), TASKS, normalization="lm-eval")
    for ex, detail in zip(TASKS, result["details"]):
        for choice, score in zip(ex["choices"], detail["scores"]):
            assert abs(score - _by_hand(model, ex["context"], choice) / len(choice.removeprefix(" "))) < 1e-4


def _export(root):
    """A tiny model with a demo-corpus tokenizer, as native checkpoint and as `llama-convert
    --to hf --tokenizer` export. Its output layer is scaled up so that choices differ by whole
    nats, not by rounding."""
    from llama.parallelize import build_chunks
    from parallel.checkpoint import save_checkpoint
    from parallel.topology import build_topology
    docs = prose_text(max_bytes=100_000).split("\n\n")
    tok = train_tokenizer(docs, root / "tok", vocab_size=CFG.vocab_size)
    topo = build_topology()
    (chunk,) = build_chunks(CFG, topo, seed=0)
    with torch.no_grad():
        chunk.output.weight.mul_(40)
    save_checkpoint(root / "ckpt", 1, [chunk], None, topo,
                    meta={"consumed_samples": 0, "config": {"model": CFG.__dict__}})
    assert convert_main(["--from", "native", "--to", "hf", "--input", str(root / "ckpt"), "--output", str(root / "hf"),
                         "--tokenizer", str(tok)]) == 0
    return tok, docs


def _items(docs, n=24, seed=0):
    """Multiple choice from held-out-like docstring sentences: the first words as context, the
    next one to three words as the answer, other sentences' continuations as distractors."""
    rng = random.Random(seed)
    sentences = [s.split() for d in docs for s in re.split(r"(?<=[.!?])\s+", d.replace("\n", " "))]
    sentences = [s for s in sentences if 7 <= len(s) <= 30]
    items = []
    for s in rng.sample(sentences, n):
        k = rng.randint(3, 6)
        ends = [s[k:k + rng.randint(1, 3)]] + [o[k:k + rng.randint(1, 3)] for o in rng.sample(sentences, 3)]
        choices = [" ".join(e) for e in ends]
        order = rng.sample(range(4), 4)
        items.append({"context": " ".join(s[:k]), "choices": [choices[i] for i in order], "answer": order.index(0)})
    return items


TASK_YAML = """task: demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.timeout(300)
def test_lm_eval_on_the_export_finds_llama_evals_scores(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    tok, docs = _export(tmp_path)
    items = _items(docs)
    # lm-eval's item: the choices without the space its target_delimiter " " puts before them
    (tmp_path / "demo_mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "demo_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "demo_mc.jsonl"))
    ours = [dict(i, choices=[" " + c for c in i["choices"]]) for i in items]
    (tmp_path / "ours.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ours))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "llama.evaluate", "--checkpoint", str(tmp_path / "hf"), "--format", "hf",
           "--tokenizer", str(tok), "--task", str(tmp_path / "ours.jsonl"), "--normalization", "lm-eval",
           "--harness", "demo_mc", "--harness-include", str(tmp_path / "tasks"),
           "--harness-samples", str(tmp_path / "samples.jsonl")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    harness = printed["harness"]["demo_mc"]
    samples = sorted((json.loads(line) for line in open(tmp_path / "samples.jsonl")), key=lambda r: r["doc_id"])
    assert len(samples) == len(items) and harness["sample_len"] == len(items)

    from llama.generate import load_model
    model = load_model(str(tmp_path / "hf"), "hf")
    tokenizer = Tokenizer(tok)
    raw = multiple_choice(model, tokenizer, ours, normalization="none")
    worst = 0.0
    for item, sample, detail in zip(ours, samples, raw["details"]):
        assert sample["arguments"] == [[item["context"], c] for c in item["choices"]]  # identical requests
        worst = max(worst, float(np.max(np.abs(np.array(sample["loglikelihoods"]) - detail["scores"]))))
        assert sample["acc"] == float(detail["pick"] == item["answer"])
    assert worst < 1e-4, worst
    assert harness["acc"] == raw["accuracy"]
    normed = multiple_choice(model, tokenizer, ours, normalization="lm-eval")
    assert [s["acc_norm"] for s in samples] == [float(d["pick"] == d["answer"]) for d in normed["details"]]
    assert harness["acc_norm"] == normed["accuracy"] == printed[str(tmp_path / "ours.jsonl")]["accuracy"]
    char = multiple_choice(model, tokenizer, ours, normalization="char")
    print(f"\nlm-eval on the export: acc {harness['acc']:.3f}, acc_norm {harness['acc_norm']:.3f} "
          f"(llama-eval: none {raw['accuracy']:.3f}, lm-eval {normed['accuracy']:.3f}, char {char['accuracy']:.3f}); "
          f"log-likelihoods within {worst:.1e} on {sum(len(i['choices']) for i in items)} choices")


def _run(argv, capsys):
    code = eval_main(argv)
    return code, capsys.readouterr().err.strip()


def test_harness_inputs_it_cannot_use_are_one_line(tmp_path, capsys, monkeypatch):
    from tests.llama.test_evaluate import _save_tiny_model
    _save_tiny_model(tmp_path / "ckpt", vocab_size=256)
    ckpt = ["--checkpoint", str(tmp_path / "ckpt")]
    cases = [(ckpt + ["--harness", "arc_easy"], "--harness on a native checkpoint needs --tokenizer"),
             (ckpt + ["--harness", " , "], "--harness needs task names"),
             (ckpt + ["--harness", "arc_easy", "--tp", "2"], "--harness runs lm-eval's own model in one process"),
             (["--checkpoint", str(tmp_path), "--format", "hf", "--harness", "arc_easy"], "has no tokenizer.json"),
             (ckpt + ["--harness", "x", "--tokenizer", "t", "--harness-model-args", "dtype"],
              "--harness-model-args: 'dtype' is not key=value"),
             (ckpt + ["--harness", "x", "--tokenizer", "t", "--harness-include", str(tmp_path / "no")],
              "--harness-include '" + str(tmp_path / "no") + "' does not exist")]
    for argv, message in cases:  # checked before lm-eval is looked for: installed or not
        code, err = _run(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    code, err = _run(ckpt + ["--harness", "arc_easy", "--tokenizer", "t"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--harness needs lm-eval" in err and 'pip install -e ".[eval]"' in err, err


def test_task_names_globs_and_unknown_names():
    from types import SimpleNamespace

    from llama.harness import resolve_tasks
    from llama.inputs import InputError
    manager = SimpleNamespace(all_tasks=["arc_easy", "arc_challenge", "hellaswag"])
    assert resolve_tasks(manager, ["arc_*", "hellaswag"], []) == ["arc_easy", "arc_challenge", "hellaswag"]
    with pytest.raises(InputError, match=r"'nope' is none of lm-eval's tasks nor in here/"):
        resolve_tasks(manager, ["hellaswag", "nope"], ["here/"])


def test_what_lm_eval_is_given_for_each_kind_of_checkpoint(tmp_path):
    """An export with tokenizer.json as it is; one without, the --tokenizer written apart (lm-eval's
    `tokenizer=`); a native checkpoint converted with it. Each loads in AutoTokenizer with
    SentencePiece's tokens."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from llama.harness import prepare
    tok, _ = _export(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "hf" / f, bare / f)
    text = " Return the number of items"
    want = Tokenizer(tok).encode(text, bos=True)
    for name, (checkpoint, fmt) in {"export": (tmp_path / "hf", "hf"), "bare": (bare, "hf"),
                                    "native": (tmp_path / "ckpt", "native")}.items():
        args = prepare(checkpoint, fmt, tok, tmp_path / f"work-{name}")
        assert set(args) == ({"pretrained", "tokenizer"} if name == "bare" else {"pretrained"}), name
        assert args["pretrained"] == str(checkpoint if fmt == "hf" else tmp_path / "work-native" / "hf")
        loaded = transformers.AutoTokenizer.from_pretrained(args.get("tokenizer", args["pretrained"]))
        assert loaded.encode(text) == want, name
