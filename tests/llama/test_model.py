"""The model against independent references: a plain-PyTorch LLaMA written from Meta's code
(tests/llama/reference.py) and transformers' LlamaForCausalLM; recompute modes, bf16, backends, init."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from llama.config import LlamaConfig
from llama.model import Transformer
from parallel.memory import SavedActivationMemory
from parallel.params import init_parameters
from tests.llama.reference import reference_logits

pytestmark = pytest.mark.timeout(60)

SMALL = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=64)


def small_cfg(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**SMALL, **overrides})


def build(cfg: LlamaConfig, seed: int = 0, perturb_norms: bool = True, **kwargs) -> Transformer:
    """Our model with the deterministic init; norm weights made non-trivial so that a swapped or
    missing norm weight would show (the init sets them all to one)."""
    model = Transformer(cfg, **kwargs)
    init_parameters(model, seed)
    if perturb_norms:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def tokens_for(cfg: LlamaConfig, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Against the plain-PyTorch reference


@pytest.mark.parametrize("overrides", [{}, {"rope_theta": 500000.0, "n_heads": 2, "norm_eps": 1e-5}])
def test_logits_match_reference(overrides):
    cfg = small_cfg(**overrides)
    model = build(cfg, attention="sdpa").eval()
    tokens = tokens_for(cfg, 2, 17)
    with torch.no_grad():
        ours = model(tokens)
    assert ours.dtype == torch.float32 and ours.shape == (2, 17, cfg.vocab_size)
    ref = reference_logits(model.state_dict(), cfg, tokens).float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_loss_matches_reference_with_padded_vocabulary():
    """Vocabulary padded to 128 columns: the loss is still the cross-entropy over the 97 real ones."""
    cfg = small_cfg()
    model = build(cfg, attention="sdpa", vocab_pad_multiple=64)
    assert model.padded_vocab == 128
    tokens = tokens_for(cfg, 2, 17)
    targets = tokens_for(cfg, 2, 17, seed=1)
    with torch.no_grad():
        loss = model(tokens, targets)
        logits = model.gather_logits(model(tokens))
    ref = reference_logits(model.state_dict(), cfg, tokens)
    torch.testing.assert_close(logits, ref.float(), atol=1e-5, rtol=1e-5)
    ref_loss = F.cross_entropy(ref.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Against transformers' LlamaForCausalLM


def hf_config(cfg: LlamaConfig):
    from transformers import LlamaConfig as HFLlamaConfig

    kwargs = dict(hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, rms_norm_eps=cfg.norm_eps,
                  vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False, hidden_act="silu")
    try:  # transformers >= 5: rope_theta lives in rope_parameters
        hf = HFLlamaConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    except (TypeError, AttributeError, KeyError):  # transformers 4.x
        hf = HFLlamaConfig(**kwargs, rope_theta=cfg.rope_theta)
    hf._attn_implementation = "eager"
    return hf


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved-pair RoPE rows -> HF's half-split rows (transformers' convert_llama_weights_to_hf)."""
    dim_out, dim_in = w.shape
    head_dim = dim_out // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)


def to_hf_state_dict(sd: dict, cfg: LlamaConfig, permute: bool = True) -> dict:
    perm = (lambda w: permute_rotary(w, cfg.n_heads)) if permute else (lambda w: w)
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(cfg.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out.update({
            h + "self_attn.q_proj.weight": perm(sd[m + "attention.wq.weight"]),
            h + "self_attn.k_proj.weight": perm(sd[m + "attention.wk.weight"]),
            h + "self_attn.v_proj.weight": sd[m + "attention.wv.weight"],
            h + "self_attn.o_proj.weight": sd[m + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": sd[m + "feed_forward.w1.weight"],
            h + "mlp.up_proj.weight": sd[m + "feed_forward.w3.weight"],
            h + "mlp.down_proj.weight": sd[m + "feed_forward.w2.weight"],
            h + "input_layernorm.weight": sd[m + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": sd[m + "ffn_norm.weight"],
        })
    return out


def hf_logits(model: Transformer, cfg: LlamaConfig, tokens: torch.Tensor, permute: bool = True) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(cfg)).float().eval()
    result = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg, permute), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        return hf(input_ids=tokens).logits


@pytest.fixture(scope="module")
def hf_case():
    pytest.importorskip("transformers")
    cfg = small_cfg()
    model = build(cfg, attention="sdpa").eval()
    tokens = tokens_for(cfg, 2, 17)
    with torch.no_grad():
        ours = model(tokens)
    return cfg, model, tokens, ours


def test_logits_match_transformers(hf_case):
    cfg, model, tokens, ours = hf_case
    theirs = hf_logits(model, cfg, tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_transformers_comparison_detects_wrong_rope_convention(hf_case):
    """Without the row permutation (i.e. with the other RoPE convention) the logits clearly differ,
    so the comparison above would catch a model that rotated the wrong pairs."""
    cfg, model, tokens, ours = hf_case
    theirs = hf_logits(model, cfg, tokens, permute=False)
    assert (ours - theirs).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------
# Activation recomputation


def saved_bytes_and_grads(cfg: LlamaConfig, recompute: str, batch: int, seq: int):
    model = build(cfg, seed=3, attention="sdpa", recompute=recompute)
    tokens = tokens_for(cfg, batch, seq, seed=4)
    targets = tokens_for(cfg, batch, seq, seed=5)
    mode = SavedActivationMemory()
    with mode:
        loss = model(tokens, targets)
    gc.collect()
    saved = mode.live_bytes(exclude=[*model.parameters(), *model.buffers(), tokens, targets, loss])
    loss.backward()
    return saved, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_recompute_modes_give_identical_gradients_and_save_less_memory():
    cfg = small_cfg()
    results = {m: saved_bytes_and_grads(cfg, m, batch=4, seq=64) for m in ("none", "selective", "full")}
    saved = {m: r[0] for m, r in results.items()}
    print(f"\nbytes kept for backward: {saved}")
    _, loss_ref, grads_ref = results["none"]
    for m in ("selective", "full"):
        _, loss, grads = results[m]
        assert torch.equal(loss, loss_ref), m
        assert grads.keys() == grads_ref.keys()
        for name, g in grads.items():
            assert g is not None, (m, name)
            assert torch.equal(g, grads_ref[name]), (m, name, (g - grads_ref[name]).abs().max().item())
    assert saved["full"] < saved["selective"] < saved["none"]


@pytest.mark.parametrize("kv", [8, 2, 1])
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_activation_memory_formula_holds_under_grouped_query_attention(kv, recompute):
    """A layer's bytes kept for backward (a 2-layer minus a 1-layer model, bf16) are what the
    start-up summary's formula predicts: with fewer kv heads, selective recompute keeps narrower
    wk/wv outputs; without recompute the attention keeps k and v repeated to every head."""
    from llama.memory_estimate import activation_bytes_per_layer
    kept = []
    for layers in (1, 2):
        cfg = LlamaConfig(dim=128, n_layers=layers, n_heads=8, n_kv_heads=kv, vocab_size=256, multiple_of=32,
                          max_seq_len=64)
        model = Transformer(cfg, attention="sdpa", recompute=recompute, dtype=torch.bfloat16)
        init_parameters(model, 0)
        tokens = tokens_for(cfg, 2, 64)
        watch = SavedActivationMemory()
        with watch:
            loss = model(tokens, tokens)
        gc.collect()
        kept.append(watch.live_bytes(exclude=[*model.parameters(), *model.buffers(), tokens, loss]))
    want = activation_bytes_per_layer(recompute, 64, 2, 128, cfg.ffn_dim, 8, 1, False, kv=kv)
    assert kept[1] - kept[0] == want


# ---------------------------------------------------------------------------------------------
# bf16


def test_bf16_forward_backward():
    cfg = small_cfg()
    model = build(cfg, dtype=torch.bfloat16, attention="sdpa")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tokens, targets = tokens_for(cfg, 2, 32), tokens_for(cfg, 2, 32, seed=1)
    loss = model(tokens, targets)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad).all(), name
    # The same (bf16-representable) weights in fp32.
    ref = Transformer(cfg, attention="sdpa")
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        loss32 = ref(tokens, targets)
    assert abs(loss.item() - loss32.item()) <= 2e-2 * abs(loss32.item()), (loss.item(), loss32.item())
    # And that fp32 loss is the reference cross-entropy.
    ref_logits = reference_logits(ref.state_dict(), cfg, tokens)
    expected = F.cross_entropy(ref_logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    assert abs(loss32.item() - expected.item()) < 1e-5


# ---------------------------------------------------------------------------------------------
# Attention backends


def test_xformers_on_cpu_fails_clearly():
    with pytest.raises(ValueError, match="xformers") as info:
        Transformer(small_cfg(), attention="xformers")
    assert "sdpa" in str(info.value)


def test_unknown_backend_fails():
    with pytest.raises(ValueError, match="bogus"):
        Transformer(small_cfg(), attention="bogus")


def test_auto_backend_on_cpu_is_sdpa():
    assert Transformer(small_cfg(), attention="auto").backend == "sdpa"
    assert Transformer(small_cfg(), attention="sdpa").backend == "sdpa"


def test_unknown_recompute_mode_fails():
    with pytest.raises(ValueError, match="bogus"):
        Transformer(small_cfg(), recompute="bogus")


def test_sequence_longer_than_max_seq_len_fails():
    cfg = small_cfg(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(cfg)(tokens_for(cfg, 1, 9))


# ---------------------------------------------------------------------------------------------
# Layout-free initialisation


def test_init_is_deterministic_per_seed():
    cfg = small_cfg()
    a = build(cfg, seed=7, perturb_norms=False).state_dict()
    b = build(cfg, seed=7, perturb_norms=False).state_dict()
    c = build(cfg, seed=8, perturb_norms=False).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        if name.endswith("norm.weight"):
            assert torch.equal(a[name], torch.ones_like(a[name])), name
        else:
            assert not torch.equal(a[name], c[name]), name


def test_init_depends_on_name_not_on_layout():
    """A pipeline stage holding only layer 1 gets exactly layer 1 of the whole model."""
    cfg = small_cfg()
    full = build(cfg, seed=7, perturb_norms=False).state_dict()
    stage = Transformer(cfg, layer_ids=[1], first_stage=False)
    init_parameters(stage, 7)
    stage_sd = stage.state_dict()
    assert set(stage_sd) == {k for k in full if k.startswith("layers.1.")} | {"norm.weight", "output.weight"}
    for name, value in stage_sd.items():
        assert torch.equal(value, full[name]), name


def test_init_scales():
    """N(0, 0.02²) weights, residual-output projections (wo, w2) scaled by 1/sqrt(2·n_layers), norms at one."""
    cfg = small_cfg(n_layers=4, dim=128, vocab_size=512)
    sd = build(cfg, seed=0, perturb_norms=False).state_dict()
    for name, w in sd.items():
        if name.endswith("norm.weight"):
            continue
        expected = 0.02 / (2 * cfg.n_layers) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else 0.02
        assert abs(w.std().item() - expected) < 0.1 * expected, name
        assert abs(w.mean().item()) < 0.1 * expected, name
