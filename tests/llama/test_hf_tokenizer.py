"""Hugging Face's tokenizer files written from the SentencePiece model: transformers'
AutoTokenizer gives SentencePiece's tokens, `<s>` first, on the demo corpus (texts that begin
with spaces included), decodes them back alike, and `llama-convert --to hf --tokenizer` writes
them beside the weights, or refuses a tokenizer it cannot express in one line before writing."""
import json
import random

import pytest
import sentencepiece as spm
import torch

from llama.config import LlamaConfig
from llama.convert_cli import main as convert_main
from llama.demo_corpus import code_docs, prose_docs, take
from llama.hf_tokenizer import check_tokenizer, spm_settings, write_hf_tokenizer
from llama.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's tokenizer (build_demo's options: 4096 ids, prose and code) on a quarter of
    its text, the held-out docstrings, and the tokenizer files written for it."""
    root = tmp_path_factory.mktemp("demo-tok")
    prose, code = take(prose_docs(), 500_000), take(code_docs(), 500_000)
    model = train_tokenizer([d for i, d in enumerate(prose) if i % 20 != 19] + code, root / "tokenizer",
                            vocab_size=4096)
    write_hf_tokenizer(check_tokenizer(model, 4096), root / "hf")
    return {"model": model, "hf": root / "hf", "valid": prose[19::20], "code": code}


def _texts(demo) -> list[str]:
    """Held-out docstrings whole and line by line, every line also after one space, two spaces,
    a tab and a newline; lines of code; and texts the corpus lacks (bytes, digits, whitespace)."""
    rng = random.Random(0)
    texts = list(demo["valid"])
    lines = [line for doc in demo["valid"] for line in doc.split("\n")]
    lines += rng.sample([line for doc in demo["code"] for line in doc.split("\n")], 2000)
    for line in lines:
        texts += [line, " " + line, "  " + line.strip(), "\t" + line, "\n" + line]
    return texts + ["", " ", "  ", "\n", " \n x", "héllo wörld, 東京 🙂", "  12345", "x 9876543210", " Re", "Re"]


def test_transformers_gives_sentencepieces_tokens_on_the_demo_corpus(demo):
    sp = Tokenizer(demo["model"])
    hf = transformers.AutoTokenizer.from_pretrained(demo["hf"])
    # <s> comes from tokenizer.json's post-processor (transformers 5 reads add_bos_token only without one)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0) and hf.encode("Re")[0] == 1
    assert hf.convert_ids_to_tokens(hf.encode(" Re")) == ["<s>", "▁▁", "Re"]  # SentencePiece's dummy prefix, always
    texts = _texts(demo)
    differ = [t for t in texts if hf.encode(t) != sp.encode(t, bos=True)]
    assert not differ, (len(differ), len(texts), differ[:5])
    undecoded = [t for t in texts[:5000] if hf.decode(hf.encode(t), skip_special_tokens=True) != t]
    assert not undecoded, undecoded[:5]
    print(f"\n{len(texts)} demo-corpus texts: transformers' tokens equal SentencePiece's on every one")


def test_the_settings_read_without_protobuf_equal_protobufs(demo):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    proto.ParseFromString(demo["model"].read_bytes())
    got = spm_settings(Tokenizer(demo["model"]))
    n = proto.normalizer_spec
    assert got == {"model_type": "bpe" if proto.trainer_spec.model_type == 2 else "other",
                   "byte_fallback": proto.trainer_spec.byte_fallback,
                   "treat_whitespace_as_suffix": proto.trainer_spec.treat_whitespace_as_suffix,
                   "normalization": n.name, "precompiled_charsmap": bool(n.precompiled_charsmap),
                   "add_dummy_prefix": n.add_dummy_prefix, "remove_extra_whitespaces": n.remove_extra_whitespaces,
                   "escape_whitespaces": n.escape_whitespaces}
    assert got["add_dummy_prefix"] and not got["remove_extra_whitespaces"] and got["byte_fallback"]


def _native_checkpoint(path, vocab_size):
    from llama.parallelize import build_chunks
    from parallel.checkpoint import save_checkpoint
    from parallel.topology import build_topology
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=vocab_size, multiple_of=16, max_seq_len=64)
    topo = build_topology()
    save_checkpoint(path, 1, build_chunks(cfg, topo, seed=0), None, topo,
                    meta={"consumed_samples": 0, "config": {"model": cfg.__dict__}})


def test_llama_convert_writes_a_tokenizer_that_transformers_pipelines_load(demo, tmp_path, capsys):
    _native_checkpoint(tmp_path / "ckpt", 4096)
    out = tmp_path / "hf"
    assert convert_main(["--from", "native", "--to", "hf", "--input", str(tmp_path / "ckpt"), "--output", str(out),
                         "--tokenizer", str(demo["model"])]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"], config["bos_token"], config["eos_token"],
            config["unk_token"]) == (True, False, "<s>", "</s>", "<unk>")
    assert (out / "tokenizer.model").read_bytes() == demo["model"].read_bytes()
    generator = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = generator("Return the number of", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("Return the number of")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = generator.tokenizer("Return the number of", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1 and ids[0].tolist() == Tokenizer(demo["model"]).encode("Return the number of", True)
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 4096)


def _unigram(path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(take(prose_docs(), 50_000)), model_prefix=str(path),
                                   vocab_size=300, model_type="unigram", minloglevel=2)
    return path.with_suffix(".model")


def test_a_tokenizer_that_cannot_be_written_fails_before_the_weights(demo, tmp_path, capsys):
    _native_checkpoint(tmp_path / "ckpt", 600)
    base = ["--from", "native", "--to", "hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]
    cases = [(demo["model"], "has 4096 ids but model.vocab_size=600"),
             (_unigram(tmp_path / "uni"), "cannot be written as Hugging Face's tokenizer.json: it is a unigram "
                                          "model, not BPE")]
    for model, message in cases:
        assert convert_main(base + ["--tokenizer", str(model)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "hf").exists()
    assert convert_main(["--from", "native", "--to", "meta", "--input", str(tmp_path / "ckpt"), "--output",
                         str(tmp_path / "meta"), "--tokenizer", str(demo["model"])]) == 2
    assert "a tokenizer is written only beside an hf output" in capsys.readouterr().err
