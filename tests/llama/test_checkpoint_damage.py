"""Damaged or incomplete checkpoints are errors that name the file (issue 17, part 3): a flipped
byte inside a tensor fails a resume naming the file and the tensor; a missing file is named as a
file; a resume refuses missing or incomplete optimizer state, where --init-from loads the
weights alone and says so; a save that cannot be written fails with one line on every rank and
leaves the previous checkpoint in charge. Each case runs `llama-train` (its main) as a user
would; generate, eval and convert on damaged input are rows of tests/test_bad_input.py."""
import contextlib
import io
import json
import resource
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from llama import convert_cli, train
from llama.demo_corpus import prose_text
from parallel.checkpoint_pieces import PieceIndex
from tests.damage import drop_tensors, flip_piece
from tests.distributed import run_processes

pytestmark = pytest.mark.timeout(60)

TRAIN = ["--config", "configs/tiny.yaml", "--no-progress", "--set", "data.sources=[]", "--set", "data.tokenizer=''",
         "--set", "model.vocab_size=256", "--set", "model.dim=64", "--set", "model.n_layers=2",
         "--set", "train.seq_len=32", "--set", "train.global_batch=4", "--set", "train.micro_batch=1",
         "--set", "train.warmup_steps=1", "--timeout", "20"]


def _one_line(capsys, code) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("llama-train: error: "), (code, err)
    return err[0]


@pytest.fixture(scope="module", autouse=True)
def short_demo_corpus():
    """The byte-level demo corpus cut to 40 kB: building the default 600 kB takes seconds a run."""
    text = prose_text(max_bytes=40_000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "prose_text", lambda max_bytes: text)
        yield


def _main_on_rank(out_dir: str, argv: list[str], file_size_limit: int | None = None) -> None:
    """train.main on one of the ranks run_processes started (it finds their process group), as a
    launcher would start it; its exit code and stderr land in a file."""
    import os

    import torch.distributed as dist
    rank = dist.get_rank()  # main destroys the process group when it is done
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    if file_size_limit:  # a disk that fills up: writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(argv)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"code": code, "err": err.getvalue()}))


def _on_two_ranks(tmp: Path, argv: list[str], file_size_limit: int | None = None) -> list[dict]:
    out = tmp / "ranks"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    assert run_processes(_main_on_rank, 2, str(out), argv, file_size_limit) == {0: "ok", 1: "ok"}
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A 2-step run's checkpoint saved by one process (model, optimizer, meta.json, rng)."""
    root = tmp_path_factory.mktemp("damage") / "ckpt"
    assert train.main(TRAIN + ["--steps", "2", "--save", str(root)]) == 0
    return root / "step_000002"


@pytest.fixture(scope="module")
def pp2(tmp_path_factory) -> Path:
    """A root whose latest checkpoint (step 2) was saved at pp=2 by two ranks: two writers."""
    tmp = tmp_path_factory.mktemp("pp2")
    ranks = _on_two_ranks(tmp, TRAIN + ["--pp", "2", "--steps", "2", "--save", str(tmp / "root")])
    assert [r["code"] for r in ranks] == [0, 0], ranks
    return tmp / "root"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("tensor", ["layers.1.feed_forward.w2.weight", "layers.0.attention.wq.weight.exp_avg"])
def test_a_flipped_byte_fails_resume_naming_the_file_and_the_tensor(tensor, ckpt, tmp_path, capsys):
    damaged = _copy(ckpt, tmp_path / "step_000002")
    file, key = flip_piece(damaged, tensor)
    line = _one_line(capsys, train.main(TRAIN + ["--steps", "3", "--resume", str(damaged)]))
    assert f"tensor file '{file}': tensor '{key}' fails its checksum" in line and key.startswith(tensor + "@"), line


def test_damage_another_dp_rank_reads_fails_every_rank(ckpt, tmp_path):
    """At dp=2 with the distributed optimizer, dp rank 1 holds the embedding's Adam state (buckets
    run from the last parameter to the first) and reads it without verifying: dp rank 0 verifies
    all of its stage's state, names the damage, and both ranks stop."""
    damaged = _copy(ckpt, tmp_path / "step_000002")
    file, key = flip_piece(damaged, "tok_embeddings.weight.exp_avg")
    ranks = _on_two_ranks(tmp_path, TRAIN + ["--distributed-optimizer", "--steps", "3", "--resume", str(damaged)])
    lines = [[line for line in r["err"].splitlines() if line.strip()] for r in ranks]
    assert [r["code"] for r in ranks] == [2, 2] and [len(x) for x in lines] == [1, 1], ranks
    assert f"tensor file '{file}': tensor '{key}' fails its checksum" in lines[0][0], lines
    assert lines[1][0] == "llama-train: error: another rank could not load the checkpoint (its error says why)"


def _is_state(name: str) -> bool:
    return name.endswith((".master", ".exp_avg", ".exp_avg_sq"))


def test_resume_refuses_a_checkpoint_without_optimizer_state(ckpt, tmp_path, capsys):
    bare = _copy(ckpt, tmp_path / "bare")
    drop_tensors(bare, lambda name: not _is_state(name))
    line = _one_line(capsys, train.main(TRAIN + ["--steps", "3", "--resume", str(bare)]))
    assert f"checkpoint '{bare}' has no optimizer state" in line and "--init-from" in line, line


def test_resume_refuses_incomplete_optimizer_state_and_init_from_loads_the_weights(ckpt, tmp_path, capsys):
    partial = _copy(ckpt, tmp_path / "partial")
    drop_tensors(partial, lambda name: not name.startswith("layers.1.attention.wo.weight."))
    line = _one_line(capsys, train.main(TRAIN + ["--steps", "3", "--resume", str(partial)]))
    assert "lacks the optimizer state of 3 tensors (the first: 'layers.1.attention.wo.weight." in line, line

    assert train.main(TRAIN + ["--steps", "1", "--init-from", str(partial)]) == 0
    out = capsys.readouterr().out
    pieces = {name: t for f in (partial / "shards").glob("*.safetensors") for name, t in load_file(f).items()}
    n_params = sum(t.numel() for key, t in pieces.items() if not _is_state(key.split("@")[0]))  # another reader
    assert (f"initialised from {partial} (step 2): {n_params:,} parameters, weights only; optimizer state and data "
            "position start fresh") in out, out
    assert "step 0 loss" in out  # a fresh run: step 0, not the checkpoint's step 2


def _as_logical_files(ckpt: Path, out: Path, version: int) -> Path:
    """The checkpoint rewritten in format version 1 or 2's layout (whole logical tensors in
    model-pp000 and optim-pp000), by Hugging Face's writer, which adds no checksums."""
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns("shards", "index.json"))
    index = PieceIndex.open(ckpt)
    for prefix, wanted in (("model", lambda n: not _is_state(n)), ("optim", _is_state)):
        save_file({n: index.logical(n).contiguous() for n in index.tensors if wanted(n)},
                  out / f"{prefix}-pp000.safetensors")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "version": version}))
    return out


def test_version_1_checkpoints_of_whole_tensors_still_resume(ckpt, tmp_path, capsys):
    """Format 1 files (whole logical tensors, no checksums) load unverified, with their optimizer
    state; the same files under a version 2 meta.json are refused (2 writes checksums)."""
    old = _as_logical_files(ckpt, tmp_path / "v1", 1)
    assert train.main(TRAIN + ["--steps", "3", "--resume", str(old)]) == 0
    assert f"resumed from {old} at step 2" in capsys.readouterr().out
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    line = _one_line(capsys, train.main(TRAIN + ["--steps", "3", "--resume", str(old)]))
    assert "model-pp000.safetensors' has no checksums, which format version 2 writes into every file" in line, line


def test_a_deleted_file_is_named_as_a_missing_file(pp2, tmp_path, capsys):
    damaged = _copy(pp2 / "step_000002", tmp_path / "step_000002")
    (damaged / "shards" / "rank00001.safetensors").unlink()
    line = _one_line(capsys, train.main(TRAIN + ["--steps", "3", "--resume", str(damaged)]))
    assert f"checkpoint file '{damaged / 'shards' / 'rank00001.safetensors'}' is missing" in line, line
    assert convert_cli.main(["--from", "native", "--to", "hf", "--input", str(damaged), "--output",
                             str(tmp_path / "hf")]) == 2
    assert "rank00001.safetensors' is missing" in capsys.readouterr().err


def test_an_unwritable_save_directory_fails_with_one_line_on_every_rank(tmp_path):
    (tmp_path / "a-file").write_text("not a directory\n")
    save = tmp_path / "a-file" / "ckpt"
    ranks = _on_two_ranks(tmp_path, TRAIN + ["--pp", "2", "--steps", "1", "--save", str(save)])
    for rank in ranks:
        lines = [line for line in rank["err"].splitlines() if line.strip()]
        assert rank["code"] == 2 and len(lines) == 1, ranks
        assert lines[0].startswith(f"llama-train: error: cannot save checkpoint step_000001 in '{save}': "), lines
        assert lines[0].endswith("no earlier checkpoint is affected"), lines
    assert "Not a directory" in ranks[0]["err"]  # rank 0 creates the directory
    assert "another rank could not write its part" in ranks[1]["err"]


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_in_charge(pp2, tmp_path, capsys):
    root = _copy(pp2, tmp_path / "root")
    before = {p.name: p.read_bytes() for p in (root / "step_000002").iterdir() if p.is_file()}
    limit = 128 * 1024  # under each rank's file of pieces (~560 KB), above meta.json and the RNG states
    ranks = _on_two_ranks(tmp_path, TRAIN + ["--pp", "2", "--steps", "4", "--resume", str(root), "--save", str(root)],
                          file_size_limit=limit)
    for stage, rank in enumerate(ranks):  # each stage's writer hits the limit in its own file
        lines = [line for line in rank["err"].splitlines() if line.strip()]
        assert rank["code"] == 2 and len(lines) == 1, ranks
        assert lines[0] == (f"llama-train: error: cannot save checkpoint step_000004 in '{root}': cannot write "
                            f"tensor file '{root / 'step_000004.tmp' / 'shards' / f'rank{stage:05d}.safetensors'}': "
                            "File too large; 'latest' still names step_000002"), lines
    assert (root / "latest").read_text() == "step_000002\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]  # the partial one removed
    assert {p.name: p.read_bytes() for p in (root / "step_000002").iterdir() if p.is_file()} == before
    assert train.main(TRAIN + ["--steps", "3", "--resume", str(root)]) == 0  # and it still resumes
    assert "resumed from" in capsys.readouterr().out
