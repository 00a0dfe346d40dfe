"""Generation: the KV cache gives exactly what recomputing the whole prefix gives, at tp=1 and
tp=2; sampling, EOS and prompts of different lengths behave; pipeline stages (pp=2, tp=2 × pp=2)
generate what one process does."""
import pytest
import torch

from llama.config import LlamaConfig
from llama.generate import generate, new_caches, sample_next
from llama.model import Transformer
from llama.parallelize import build_chunks
from parallel.layers import NO_TP, TensorParallel
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=64)
PROMPTS = [[1, 5, 9, 11, 3], [1, 40], [1, 7, 7, 7, 7, 7, 7, 7, 2, 60]]


GQA = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)
GQA_4 = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


def _sharpen(model):
    with torch.no_grad():  # sharper logits than the 0.02 init gives, so greedy ties are not an issue
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def _model(tp=NO_TP, cfg=CFG):
    model = Transformer(cfg, tp=tp, attention="sdpa").eval()
    init_parameters(model, 11)
    return _sharpen(model)


def _stage(tp, pp, cfg=CFG):
    """This rank's pipeline stage, with the weights `_model` gives the same layers."""
    topo = topology(tp=tp, pp=pp)
    return _sharpen(build_chunks(cfg, topo, seed=11, attention="sdpa")[0].eval()), topo


def _cached_and_recomputed(tp_size, cfg=CFG):
    model = _model(TensorParallel(topology(tp=tp_size).tp_group) if tp_size > 1 else TensorParallel(), cfg)
    cached = generate(model, PROMPTS, 20)
    recomputed = generate(model, PROMPTS, 20, use_cache=False)
    return cached, recomputed


def test_kv_cache_equals_recomputation_at_tp1():
    cached, recomputed = _cached_and_recomputed(1)
    assert cached == recomputed and all(len(c) == 20 for c in cached)


def test_kv_cache_equals_recomputation_at_tp2_and_tp1():
    out = run_on_ranks(_cached_and_recomputed, 2, 2)
    assert out[0] == out[1]  # both tp ranks produce the same tokens
    assert out[0][0] == out[0][1]
    assert out[0][0] == _cached_and_recomputed(1)[0]  # and the same as one process


def test_grouped_query_attention_caches_only_its_kv_heads_and_generates_alike_at_tp2():
    cache = new_caches(_model(cfg=GQA), 1, 8)["0"]
    assert cache.k.shape == (1, 8, 2, 8)  # 2 kv heads of head_dim 8, not the 8 query heads
    one = _cached_and_recomputed(1, GQA)
    assert one[0] == one[1]
    out = run_on_ranks(_cached_and_recomputed, 2, 2, GQA)
    assert out[0] == out[1] and out[0][0] == out[0][1] == one[0]


def test_prompts_are_kept_and_eos_stops():
    model = _model()
    first = generate(model, PROMPTS, 20)
    eos = first[1][3]  # a token the second prompt will produce: make it the EOS
    out = generate(model, PROMPTS, 20, eos_id=eos)
    assert out[1] == first[1][:3]
    for o, f in zip(out, first):
        assert o == (f[:f.index(eos)] if eos in f else f)


def test_top_p_only_samples_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 0.7, gen)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are outside the nucleus
    picks = {int(sample_next(logits, 1.0, 1.0, gen)) for _ in range(600)}
    assert picks == {0, 1, 2, 3}
    assert int(sample_next(logits, 0.0, 1.0)) == 0


def _pipeline_generate(tp, pp, cfg, **kwargs):
    model, topo = _stage(tp, pp, cfg)
    return generate(model, PROMPTS, 20, topo=topo, **kwargs)


def test_greedy_generation_at_tp2_pp2_equals_one_process_with_grouped_query_attention():
    out = run_on_ranks(_pipeline_generate, 4, 2, 2, GQA_4)
    assert out[0] == out[1] == out[2] == out[3]  # every stage and tp rank holds the tokens
    assert out[0] == generate(_model(cfg=GQA_4), PROMPTS, 20)


def _pp2_greedy(eos):
    model, topo = _stage(1, 2)
    return (generate(model, PROMPTS, 20, topo=topo), generate(model, PROMPTS, 20, use_cache=False, topo=topo),
            generate(model, PROMPTS, 20, eos_id=eos, topo=topo),
            generate(model, PROMPTS[1:2], 20, eos_id=eos, topo=topo))


def test_greedy_generation_at_pp2_equals_one_process_with_and_without_cache_and_with_eos():
    model = _model()
    first = generate(model, PROMPTS, 20)
    eos = first[1][3]  # the second prompt's 4th new token
    one = first, first, generate(model, PROMPTS, 20, eos_id=eos), generate(model, PROMPTS[1:2], 20, eos_id=eos)
    assert one[2][1] == one[3][0] == first[1][:3]  # alone, that prompt stops every stage after 4 steps
    out = run_on_ranks(_pp2_greedy, 2, eos)
    assert out[0] == out[1] == one


def test_sampled_generation_at_pp2_equals_pp1():
    kwargs = dict(temperature=0.9, top_p=0.8, seed=5)
    out = run_on_ranks(_pipeline_generate, 2, 1, 2, CFG, **kwargs)
    one = generate(_model(), PROMPTS, 20, **kwargs)
    assert out[0] == out[1] == one
    assert one != generate(_model(), PROMPTS, 20)  # it did sample


def test_unsupported_pipeline_settings_fail_with_one_line():
    stage = Transformer(CFG, attention="sdpa", layer_ids=[0], first_stage=True, last_stage=False)
    with pytest.raises(ValueError, match=r"first_stage=True, last_stage=False, but this rank is stage 0 of pp=1") \
            as err:
        generate(stage, PROMPTS, 4)  # a stage without its topology
    chunks = [_model(), _model()]
    with pytest.raises(ValueError, match=r"2 model chunks on this rank \(vpp=2\).*\(vpp=1\)") as err2:
        generate(chunks, PROMPTS, 4)  # interleaved chunks
    assert "\n" not in str(err.value) + str(err2.value)
    assert generate([_model()], PROMPTS, 4) == generate(_model(), PROMPTS, 4)  # build_chunks' list of one
