"""Checkpoint conversion: exact round trips through every format, and a model from transformers
running at tp=2 × pp=2 with transformers' own logits."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from llama.config import LlamaConfig
from llama.convert import ConversionError, convert
from llama.convert_cli import main as convert_main
from llama.formats import hf_config
from llama.parallelize import activation_shape, build_chunks
from parallel.checkpoint import load_checkpoint
from parallel.pipeline.p2p import PipelineP2P
from tests.distributed import run_on_ranks, topology

CFG = LlamaConfig(dim=64, n_layers=4, n_heads=4, vocab_size=250, multiple_of=16, max_seq_len=64)


GQA = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=250, multiple_of=16, max_seq_len=64)
# LLaMA 3's shape in small: θ 500000 and 3.1's frequency scaling as Meta's code fixes it (head_dim
# 8's wavelengths, 6 to 118k positions, fall in all three of its bands), a vocabulary no tp divides
LLAMA3 = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=251, multiple_of=16, max_seq_len=8200,
                     rope_theta=500000.0, rope_scaling={"rope_type": "llama3"})
# LLaMA 3.2's small models: the head tied to the embedding, rope scaling factor 32
LLAMA32 = dataclasses.replace(LLAMA3, tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 32.0})


def _hf_model(path, cfg=CFG):
    import transformers
    config = transformers.LlamaConfig(**hf_config(cfg))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms that are not all ones, so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    model.save_pretrained(path)
    return model


def _as_pytorch_bin(path, model, shards: int = 1):
    """Rewrite a saved model's weights as older transformers wrote them (this one writes
    safetensors only): pytorch_model.bin, or `shards` pytorch_model-NNNNN-of-NNNNN.bin files
    and pytorch_model.bin.index.json."""
    (path / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, path / file)
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))


def _same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hf_to_native_to_hf_is_exact(tmp_path):
    _hf_model(tmp_path / "hf")
    convert("hf", tmp_path / "hf", "native", tmp_path / "native")
    convert("native", tmp_path / "native", "hf", tmp_path / "hf2")
    _same_tensors(load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors"))
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["intermediate_size"] == CFG.ffn_dim


def test_meta_tp2_to_native_to_meta_tp2_is_exact(tmp_path):
    _hf_model(tmp_path / "hf")
    convert("hf", tmp_path / "hf", "meta", tmp_path / "meta", tp=2)  # vocab 250 splits evenly over 2
    convert("meta", tmp_path / "meta", "native", tmp_path / "native")
    convert("native", tmp_path / "native", "meta", tmp_path / "meta2", tp=2)
    for rank in (0, 1):
        a = torch.load(tmp_path / "meta" / f"consolidated.0{rank}.pth", weights_only=True)
        b = torch.load(tmp_path / "meta2" / f"consolidated.0{rank}.pth", weights_only=True)
        _same_tensors(a, b)
        assert a["tok_embeddings.weight"].shape == (250, 32) and a["output.weight"].shape == (125, 64)
        assert a["layers.0.attention.wo.weight"].shape == (64, 32)
    assert json.loads((tmp_path / "meta2" / "params.json").read_text())["vocab_size"] == 250


def test_meta_with_a_vocabulary_that_needs_padding(tmp_path):
    _hf_model(tmp_path / "hf")
    convert("hf", tmp_path / "hf", "meta", tmp_path / "meta", tp=4)  # 250 rows → 252, zeros at the end
    shard = torch.load(tmp_path / "meta" / "consolidated.03.pth", weights_only=True)
    assert shard["output.weight"].shape == (63, 64) and torch.all(shard["output.weight"][-2:] == 0)
    convert("meta", tmp_path / "meta", "hf", tmp_path / "hf2")
    _same_tensors(load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors"))


def _pipeline_logits(path, tokens, cfg=CFG, tp=2, pp=2):
    topo = topology(tp=tp, pp=pp)
    (chunk,) = build_chunks(cfg, topo, seed=0, attention="sdpa")
    load_checkpoint(path, [chunk], None, topo, weights_only=True)
    if pp == 1:
        with torch.no_grad():
            return chunk.gather_logits(chunk(tokens))
    p2p = PipelineP2P(topo)
    p2p.handshake(activation_shape(cfg, *tokens.shape, tp, False), torch.float32, 1, 1, 0)
    with torch.no_grad():
        if topo.is_first_stage:
            p2p.exchange([(chunk(tokens), 1, 1)], [])
            p2p.flush()
            return None
        (take,) = p2p.exchange([], [(0, 1)])
        return chunk.gather_logits(chunk(take()))


def test_a_transformers_model_converted_to_native_gives_its_logits_at_tp2_pp2(tmp_path):
    model = _hf_model(tmp_path / "hf")
    convert("hf", tmp_path / "hf", "native", tmp_path / "native")
    tokens = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens).logits
    got = [x for x in run_on_ranks(_pipeline_logits, 4, str(tmp_path / "native"), tokens) if x is not None]
    assert len(got) == 2  # the two tp ranks of the last stage
    for logits in got:
        assert (logits - want).abs().max().item() <= 1e-5


def test_bad_inputs_fail_with_the_file_and_the_rule(tmp_path, capsys):
    _hf_model(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] += 16
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"mlp.gate_proj|feed_forward.w1.weight has shape \(176, 64\), the "
                                              r"config says \(192, 64\)"):
        convert("hf", tmp_path / "hf", "native", tmp_path / "native")
    config["intermediate_size"] -= 16
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    raw = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "hf" / "model.safetensors").write_bytes(raw[:-100])
    assert convert_main(["--from", "hf", "--to", "native", "--input", str(tmp_path / "hf"),
                         "--output", str(tmp_path / "n2")]) == 2
    assert "model.safetensors' is truncated" in capsys.readouterr().err
    (tmp_path / "hf" / "model.safetensors").write_bytes(raw)
    assert convert_main(["--from", "hf", "--to", "meta", "--input", str(tmp_path / "hf"),
                         "--output", str(tmp_path / "m"), "--tp", "2"]) == 0
    assert "peak memory" in capsys.readouterr().out


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_files_convert_exactly(tmp_path, shards):
    """Older Hugging Face models: pytorch_model.bin, or pytorch_model-NNNNN-of-NNNNN.bin with
    pytorch_model.bin.index.json."""
    model = _hf_model(tmp_path / "hf")
    _as_pytorch_bin(tmp_path / "hf", model, shards)
    convert("hf", tmp_path / "hf", "native", tmp_path / "native")
    convert("native", tmp_path / "native", "hf", tmp_path / "hf2")
    _same_tensors(dict(model.state_dict()), load_file(tmp_path / "hf2" / "model.safetensors"))


class NeedsCode:  # a pickled object of this class can only be loaded by running this module's code
    pass


def test_a_pickle_that_needs_code_is_refused_with_a_line(tmp_path, capsys):
    _as_pytorch_bin(tmp_path / "hf", _hf_model(tmp_path / "hf"))
    state = torch.load(tmp_path / "hf" / "pytorch_model.bin", weights_only=True)
    torch.save(state | {"extra": NeedsCode()}, tmp_path / "hf" / "pytorch_model.bin")
    capsys.readouterr()
    assert convert_main(["--from", "hf", "--to", "native", "--input", str(tmp_path / "hf"),
                         "--output", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "pytorch_model.bin: refused: its pickle needs code to load (tests.llama.test_convert.NeedsCode)" in err
    (tmp_path / "hf" / "pytorch_model.bin").unlink()
    assert convert_main(["--from", "hf", "--to", "native", "--input", str(tmp_path / "hf"),
                         "--output", str(tmp_path / "n")]) == 2
    assert "no weights: none of model.safetensors.index.json" in capsys.readouterr().err


def test_a_sharded_hf_export_reloads_in_transformers_exactly(tmp_path):
    import transformers
    from safetensors import safe_open
    model = _hf_model(tmp_path / "hf")
    convert("hf", tmp_path / "hf", "native", tmp_path / "native")
    out = tmp_path / "hf2"
    assert convert_main(["--from", "native", "--to", "hf", "--input", str(tmp_path / "native"),
                         "--output", str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (out / "model.safetensors").exists()
    sizes = {}
    for f in files:
        with safe_open(out / f, "pt") as st:
            sizes[f] = sum(st.get_tensor(k).numel() * 4 for k in st.keys())
    assert max(sizes.values()) <= 100_000 and index["metadata"]["total_size"] == sum(sizes.values())
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    _same_tensors(dict(model.state_dict()), dict(reloaded.state_dict()))
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reloaded(tokens).logits)


@pytest.mark.parametrize("text,message", [("5XB", "is not a size like 5GB"), ("0", "must be at least one byte")])
def test_a_bad_shard_size_is_one_line(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exit_:
        convert_main(["--from", "native", "--to", "hf", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                      "--max-shard-size", text])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("cfg", [GQA, LLAMA3, LLAMA32], ids=["gqa", "llama3", "llama3.2-tied"])
def test_grouped_query_attention_converts_exactly_and_gives_transformers_logits(tmp_path, cfg):
    """8 query heads, 2 kv heads: HF's q/k permutation per kv head for wk; Meta's shards split wk
    and wv on kv heads; logits within 1e-5 of transformers' at tp 1, 2, 4 (two copies of each kv
    head) and tp 2 x pp 2, from HF's files and from Meta's."""
    model = _hf_model(tmp_path / "hf", cfg)
    convert("hf", tmp_path / "hf", "native", tmp_path / "native")
    convert("native", tmp_path / "native", "hf", tmp_path / "hf2")
    _same_tensors(load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors"))
    convert("hf", tmp_path / "hf", "meta", tmp_path / "meta", tp=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wk.weight"].shape == (8, 64)  # one of the 2 kv heads
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and params.get("use_scaled_rope", False) == (cfg.rope_scaling is not None)
    convert("meta", tmp_path / "meta", "native", tmp_path / "native2")
    convert("native", tmp_path / "native2", "hf", tmp_path / "hf3")
    hf, hf3 = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf3" / "model.safetensors")
    if cfg.tie_word_embeddings:  # Meta's layout has no tie: the head comes back as a copy of the embedding
        assert "lm_head.weight" not in hf and "output.weight" in torch.load(tmp_path / "meta" / "consolidated.00.pth")
        assert torch.equal(hf3.pop("lm_head.weight"), hf["model.embed_tokens.weight"])
    _same_tensors(hf, hf3)
    written = json.loads((tmp_path / "hf3" / "config.json").read_text())
    assert written["rope_parameters"] == json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
    assert written["rope_scaling"] == cfg.rope_scaling  # what transformers 4.x reads instead
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens).logits
    for source, tp, pp in (("native", 1, 1), ("native", 2, 1), ("native", 4, 1), ("native", 2, 2), ("native2", 2, 2)):
        got = [x for x in run_on_ranks(_pipeline_logits, tp * pp, str(tmp_path / source), tokens, cfg, tp, pp)
               if x is not None]
        assert len(got) == tp
        for logits in got:
            assert (logits - want).abs().max().item() <= 1e-5, (source, tp, pp)
