"""Generation: the KV cache gives exactly what recomputing the whole prefix gives, at tp=1 and
tp=2; sampling, EOS and prompts of different lengths behave."""
import torch

from llama.config import LlamaConfig
from llama.generate import generate, new_caches, sample_next
from llama.model import Transformer
from parallel.layers import NO_TP, TensorParallel
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=64)
PROMPTS = [[1, 5, 9, 11, 3], [1, 40], [1, 7, 7, 7, 7, 7, 7, 7, 2, 60]]


GQA = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


def _model(tp=NO_TP, cfg=CFG):
    model = Transformer(cfg, tp=tp, attention="sdpa").eval()
    init_parameters(model, 11)
    with torch.no_grad():  # sharper logits than the 0.02 init gives, so greedy ties are not an issue
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


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
