"""Instruction fine-tuning (llama/sft.py): the template and its loss mask, the fine-tuning shard
and the packing of examples, attention kept within an example, the token-weighted loss equal to
running each example alone (one process and tp 2 × pp 2, dp 2 × pp 2), and a tiny model that
learns a synthetic instruction set."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama.config import load_config
from llama.data import PackedExamples, load_mixture
from llama.demo_corpus import prose_text
from llama.inputs import InputError
from llama.model import Transformer
from llama.packing import Packing
from llama.setup import build_rank
from llama.sft import (
    IGNORE,
    messages_of,
    packed_micro_batches,
    prompt_ids,
    render,
    response_accuracy,
    synthetic_instructions,
)
from llama.shards import Shard, ShardError
from llama.tokenizer import Tokenizer, train_tokenizer
from llama.train import train
from parallel.params import init_parameters
from parallel.topology import build_topology
from tests.distributed import run_on_ranks, topology
from tests.llama.test_train_layouts import logical_gradients, reduced_gradients

ROOT = Path(__file__).resolve().parents[2]
SEQ, VOCAB = 64, 512


def _instruction_texts(records):
    return [messages_of(r)[0]["content"] + "\n" + messages_of(r)[-1]["content"] for r in records]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small SentencePiece model over the instruction set, the template's headers and prose."""
    texts = _instruction_texts(synthetic_instructions(3000, 99)) + ["### Instruction:\n### Response:\n"] * 50
    texts += prose_text(max_bytes=60_000).split("\n\n")
    return Tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", vocab_size=VOCAB))


def _pieces(tok, ids):
    return [tok.sp.id_to_piece(i) for i in ids]


def test_template_masks_the_prompt_and_trains_the_response_and_eos(tok):
    ids, mask = render({"prompt": "Reverse the letters: a b c", "response": "c b a"}, tok)
    assert ids[0] == tok.bos_id and mask[0] == 0 and ids[-1] == tok.eos_id and mask[-1] == 1
    n_prompt = len(tok.encode("### Instruction:\nReverse the letters: a b c\n\n### Response:\n"))
    assert mask == [0] * (1 + n_prompt) + [1] * (len(ids) - 1 - n_prompt)
    assert tok.decode(ids[1:1 + n_prompt]) == "### Instruction:\nReverse the letters: a b c\n\n### Response:\n"
    assert ids[1 + n_prompt:] == tok.encode("c b a") + [tok.eos_id]
    assert prompt_ids({"prompt": "Reverse the letters: a b c", "response": "c b a"}, tok) == ids[:1 + n_prompt]
    # the same exchange as messages renders the same tokens
    same = {"messages": [{"role": "user", "content": "Reverse the letters: a b c"},
                         {"role": "assistant", "content": "c b a"}]}
    assert render(same, tok) == (ids, mask)


def test_conversations_train_every_assistant_turn_and_nothing_else(tok):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                           {"role": "assistant", "content": "see you"}]}
    ids, mask = render(record, tok)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("hello") + [tok.eos_id] + tok.encode("see you") + [tok.eos_id]
    untrained = [i for i, m in zip(ids, mask) if not m]  # each span between responses encoded in one piece
    assert untrained == ([tok.bos_id] + tok.encode("### System:\nBe brief.\n\n### Instruction:\nhi\n\n### Response:\n")
                         + tok.encode("### Instruction:\nbye\n\n### Response:\n"))
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    # the prompt for the last answer is every token before it
    assert prompt_ids(record, tok) == ids[:len(ids) - len(tok.encode("see you")) - 1]
    for bad, match in (({"prompt": "x"}, "needs 'prompt' and 'response'"),
                       ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant"),
                       ({"messages": [{"role": "robot", "content": "x"}]}, "message 0 must be"),
                       ({"messages": [], "prompt": "x"}, "both")):
        with pytest.raises(InputError, match=match):
            render(bad, tok, "f.jsonl:3")


RECORDS = [{"prompt": "Repeat the letters: a b", "response": "a b"},
           {"messages": [{"role": "user", "content": "Say the last letter: c d e"},
                         {"role": "assistant", "content": "e"}]},
           {"prompt": "Reverse the letters: f g h i", "response": "i h g f"},
           {"messages": [{"role": "system", "content": "Answer."}, {"role": "user", "content": "Say the first "
                         "letter: j a"}, {"role": "assistant", "content": "j"}]}]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_preprocessing_writes_tokens_and_mask_and_the_loader_packs_whole_examples(tok, tmp_path):
    src = _write_jsonl(tmp_path / "sft.jsonl", RECORDS * 3)
    out = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--format", "sft", "--input",
                          str(src), "--tokenizer", str(tok.path), "--output-prefix", str(tmp_path / "sft"),
                          "--workers", "2"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "12 documents" in out.stdout and "trained" in out.stdout
    shard = Shard(tmp_path / "sft")
    assert shard.n_docs == 12 and shard.loss_mask is not None and len(shard.loss_mask) == shard.n_tokens
    rendered = [render(r, tok) for r in RECORDS * 3]
    for d, (ids, mask) in enumerate(rendered):
        a, b = int(shard.offsets[d]), int(shard.offsets[d + 1])
        assert shard.tokens[a:b].tolist() == ids and shard.loss_mask[a:b].tolist() == mask
    longest = max(len(ids) for ids, _ in rendered)
    ds = PackedExamples(shard, seq_len=longest + 30, seed=3)
    seen = []
    for r in range(ds.n_windows):
        tokens, mask, positions, segments = ds.row(r)
        for seg in np.unique(segments):
            where = np.flatnonzero(segments == seg)
            assert (np.diff(where) == 1).all()  # a segment is contiguous
            assert positions[where].tolist() == list(range(len(where)))  # positions restart at each example
            if seg < segments.max() or mask[where].any():  # an example (the last segment may be padding)
                seen.append((tokens[where].tolist(), mask[where].tolist()))
            else:
                assert (tokens[where] == 0).all()
    assert sorted(seen) == sorted(rendered)  # every example once, whole
    assert ds.n_windows < len(rendered)  # several examples share a row
    # a text shard and a fine-tuning shard do not mix; a stale mask is refused
    (tmp_path / "doc.txt").write_text("plain text " * 50)
    subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(tmp_path / "doc.txt"),
                    "--tokenizer", str(tok.path), "--output-prefix", str(tmp_path / "text")], check=True, cwd=ROOT,
                   capture_output=True)
    assert Shard(tmp_path / "text").loss_mask is None
    with pytest.raises(ShardError, match="mix fine-tuning shards"):
        load_mixture([{"path": str(tmp_path / "sft")}, {"path": str(tmp_path / "text")}], 16, 0, VOCAB)
    # a bad record fails with its file and line, and leaves no shard
    from llama.preprocess import preprocess
    bad = _write_jsonl(tmp_path / "bad.jsonl", RECORDS[:2] + [{"prompt": "no response"}])
    with pytest.raises(InputError, match=r"bad.jsonl:3: a fine-tuning record needs 'prompt' and 'response'"):
        preprocess([bad], tok.path, tmp_path / "bad", workers=1, progress=False, fmt="sft")
    assert not list(tmp_path.glob("bad.*[!l]"))  # no .bin, .idx, .mask or .tmp
    (tmp_path / "text.mask").write_bytes(b"\x01" * 5)
    with pytest.raises(ShardError, match="belongs to another shard"):
        Shard(tmp_path / "text")


# ---- packed batches against each example alone ----

def _cfg(**kw):
    return dict(dim=32, n_layers=4, n_heads=4, vocab_size=VOCAB, multiple_of=16, max_seq_len=SEQ) | kw


def _run_config(tp=1, pp=1, sp=False, global_batch=8, micro_batch=2, steps=1, **train_kw):
    train_kw = dict(steps=steps, seq_len=SEQ, global_batch=global_batch, micro_batch=micro_batch, lr=1e-3,
                    warmup_steps=0, dtype="fp32", attention="sdpa", recompute="none", tp=tp, pp=pp, sp=sp,
                    grad_clip=1e9) | train_kw
    return load_config("tiny", {"model": _cfg(), "train": train_kw, "data": {"tokenizer": "", "sources": []}})


@pytest.fixture(scope="module")
def sft_shard(tok, tmp_path_factory):
    """A fine-tuning shard of 200 synthetic instructions."""
    path = tmp_path_factory.mktemp("sft") / "train"
    from llama.preprocess import preprocess
    preprocess([_write_jsonl(path.with_suffix(".jsonl"), synthetic_instructions(200, 5))], tok.path, path,
               workers=1, progress=False, fmt="sft")
    return str(path)


def _examples(rows: torch.Tensor):
    """Each example of packed rows [n, 4, L] alone: (tokens, trained-target mask)."""
    out = []
    for tokens, mask, _, segments in rows:
        for seg in segments.unique():
            where = (segments == seg).nonzero().flatten()
            if mask[where].any():
                out.append((tokens[where], mask[where]))
    return out


def _initial_model(run):
    """A plain model (autograd gradients, no buckets) with the weights train() starts from."""
    model = Transformer(run.model, attention="sdpa")
    model.load_state_dict(build_rank(run, build_topology(), torch.device("cpu")).chunks[0].state_dict())
    return model


def _per_example_reference(model, rows):
    """Σ over every example run alone (unpadded) of its trained targets' losses, / their count;
    and every parameter's gradient of that."""
    model.zero_grad(set_to_none=True)
    examples = _examples(rows)
    count = sum(int(m[1:].sum()) for _, m in examples)
    total = 0.0
    for tokens, mask in examples:
        logits = model(tokens[None, :-1])[0]
        targets = tokens[1:].masked_fill(mask[1:] == 0, IGNORE)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum") / count
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(loss, grads, ref_loss, ref_grads, what, tol=1e-5):
    assert abs(loss - ref_loss) <= tol * abs(ref_loss), f"{what}: loss {loss} vs {ref_loss}"
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        want = ref_grads[name]
        err = ((g - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
        assert err <= tol, f"{what}: gradient of {name} differs by {err:.3g}"


def test_a_packed_batch_equals_each_example_alone_on_one_process(sft_shard):
    run = _run_config()
    mix = load_mixture([{"path": sft_shard}], SEQ, run.train.seed, VOCAB)
    rows = mix.samples(0, 8)
    assert rows.shape == (8, 4, SEQ + 1) and (rows[:, 3].amax(1) >= 2).all()  # several examples a row
    model = _initial_model(run)
    ref_loss, ref_grads = _per_example_reference(model, rows)
    model.zero_grad(set_to_none=True)
    micro = packed_micro_batches(rows, 2, build_topology())
    loss = 0.0
    for tokens, targets, packing in micro:
        out = model(tokens, targets, packing=packing) / len(micro)  # the schedules' 1/m
        out.backward()
        loss += out.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _assert_close(loss, grads, ref_loss, ref_grads, "packed, 4 micro-batches")
    # the trainer's step (schedule, buckets) reports the same loss and reduces the same gradients
    with reduced_gradients() as steps:
        result = train(run, build_topology(), show_progress=False, data=mix)
    got = logical_gradients(result.chunks, build_topology(), *steps[0])
    _assert_close(result.losses[0], got, ref_loss, ref_grads, "train() at (1, 1, 1)")


def _layout_step(topo, sft_shard, sp):
    run = _run_config(tp=topo.tp, pp=topo.pp, sp=sp)
    mix = load_mixture([{"path": sft_shard}], SEQ, run.train.seed, VOCAB)
    with reduced_gradients() as steps:
        result = train(run, topo, show_progress=False, data=mix)
    grads = logical_gradients(result.chunks, topo, *steps[0])
    return result.losses[0], grads if topo.dp_rank == 0 else {}


def _ranks_step(tp, pp, sft_shard, sp):
    return _layout_step(topology(tp=tp, pp=pp), sft_shard, sp)


@pytest.mark.parametrize("tp,pp,sp", [(2, 2, False), (2, 2, True), (1, 2, False)])
def test_a_packed_batch_trains_the_same_at_tp_pp_dp(sft_shard, tp, pp, sp):
    """4 ranks: (tp, pp, dp) = (2, 2, 1) with and without sp, and (1, 2, 2): the step's loss and
    every reduced gradient equal one process's per-example computation within 1e-5."""
    run = _run_config()
    rows = load_mixture([{"path": sft_shard}], SEQ, run.train.seed, VOCAB).samples(0, 8)
    model = _initial_model(run)
    ref_loss, ref_grads = _per_example_reference(model, rows)
    outs = run_on_ranks(_ranks_step, 4, tp, pp, sft_shard, sp, timeout=120)
    grads = {}
    for loss, g in outs:
        assert abs(loss - outs[0][0]) <= 1e-6 * abs(loss)  # every rank reports the same loss
        grads.update(g)
    _assert_close(outs[0][0], grads, ref_loss, ref_grads, f"(tp, pp, dp)=({tp}, {pp}, {4 // tp // pp}) sp={sp}")


def test_attention_stays_within_an_example_and_positions_restart():
    """In one packed row, perturbing example 1 changes none of example 2's logits, and example
    2's logits equal those of it run alone at positions from 0."""
    cfg = load_config("tiny", {"model": _cfg(vocab_size=64)}).model
    model = Transformer(cfg, attention="sdpa")
    init_parameters(model, 0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 64, (11,), generator=g), torch.randint(3, 64, (9,), generator=g)
    row = torch.cat([a, b, torch.zeros(4, dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(11), torch.arange(9), torch.arange(4)])[None]
    segments = torch.tensor([0] * 11 + [1] * 9 + [2] * 4)[None]
    packing = Packing(positions, segments)
    with torch.no_grad():
        logits = model(row, packing=packing)[0]
        alone = model(b[None])[0]
        torch.testing.assert_close(logits[11:20], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(a[None])[0], logits[:11], rtol=1e-5, atol=1e-5)
        perturbed = row.clone()
        perturbed[0, :11] = torch.randint(3, 64, (11,), generator=g)
        other = model(perturbed, packing=packing)[0]
        assert torch.equal(other[11:20], logits[11:20])
        assert not torch.allclose(other[:11], logits[:11])
        # without the packing, example 2 sees example 1 (the test can tell)
        assert not torch.allclose(model(row)[0][11:20], alone, atol=1e-3)


# ---- learning ----

def _train_cli(tmp, tok, shard, steps, out, init_from=None):
    """One process of `python -m llama.train` (the real command, --init-from included)."""
    cmd = [sys.executable, "-m", "llama.train", "--config", "tiny", "--no-progress", "--seq-len", "128",
           "--global-batch-size", "16", "--micro-batch-size", "16", "--steps", str(steps), "--lr", "3e-3",
           "--save", str(out), "--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
           "--set", f"model.vocab_size={VOCAB}", "--set", "model.multiple_of=16", "--set", "model.max_seq_len=128",
           "--set", "train.warmup_steps=10", "--set", "train.weight_decay=0", "--set", "train.log_every=50",
           "--set", f"data.tokenizer={tok.path}", "--set", f"data.sources=[{{path: {shard}}}]"]
    cmd += ["--init-from", str(init_from)] if init_from else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_fine_tuning_learns_held_out_instructions(tok, tmp_path, capsys):
    """A tiny model (dim 64, 2 layers) pretrained for 150 steps on prose is the base; fine-tuned
    from it (--init-from) for 400 steps on 8000 synthetic instructions (repeat, first letter,
    last letter, count), it answers held-out instructions (letter strings never seen in
    training) by greedy generation. Exact match: base 0.00, fine-tuned 0.90 here; the
    threshold is 0.6, and at least 0.5 above the base."""
    from llama.generate import load_model
    from llama.preprocess import preprocess
    start = time.perf_counter()
    train_set = synthetic_instructions(8000, 1)
    held_out = synthetic_instructions(100, 2, exclude={r["letters"] for r in train_set})
    (tmp_path / "prose.txt").write_text(prose_text(max_bytes=200_000))
    preprocess([tmp_path / "prose.txt"], tok.path, tmp_path / "prose", workers=1, progress=False)
    preprocess([_write_jsonl(tmp_path / "train.jsonl", train_set)], tok.path, tmp_path / "sft", workers=1,
               progress=False, fmt="sft")
    _train_cli(tmp_path, tok, tmp_path / "prose", 150, tmp_path / "base")
    log = _train_cli(tmp_path, tok, tmp_path / "sft", 400, tmp_path / "tuned", init_from=tmp_path / "base")
    assert "initialised from" in log
    base, _ = response_accuracy(load_model(str(tmp_path / "base")), tok, held_out, max_new_tokens=12)
    tuned, results = response_accuracy(load_model(str(tmp_path / "tuned")), tok, held_out, max_new_tokens=12)
    with capsys.disabled():
        print(f"\nheld-out instruction accuracy (exact match, {len(held_out)} instructions): base {base:.2f}, "
              f"fine-tuned {tuned:.2f} ({time.perf_counter() - start:.0f} s); e.g. "
              + "; ".join(f"{p!r} -> {g!r}" for p, _, g in results[:3]))
    assert tuned >= 0.6 and tuned >= base + 0.5, f"base {base:.2f}, fine-tuned {tuned:.2f}"
