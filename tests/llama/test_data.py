"""Tokenizer, token shards, packing, mixture sampling and the global sample order."""
import json

import numpy as np
import pytest
import torch

from llama.data import Mixture, PackedDataset, block_counts, epoch_report, load_mixture, rank_slice
from llama.demo_corpus import prose_text
from llama.inputs import InputError
from llama.preprocess import preprocess
from llama.shards import Shard, ShardError, ShardWriter
from llama.tokenizer import Tokenizer, TokenizerError, train_tokenizer

SAMPLES = ["Prices: 1234567890 and 3.14159, year 2023.", "naïve café, façade, Ærøskøbing, São Paulo",
           "東京タワーは高い。中文也可以。한국어",
           "emoji 🚀🎉👩‍💻 and flags 🇫🇷", "tabs\tand  double  spaces\n\nnewlines"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = prose_text(max_bytes=300_000).split("\n\n")
    return Tokenizer(train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tok", vocab_size=1000))


def test_round_trip_is_exact_and_digits_are_single_tokens(tokenizer):
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("x 9876543210")]
    digits = [p.lstrip("▁") for p in pieces if p.lstrip("▁").isdigit()]
    assert digits == list("9876543210")  # every digit its own token
    ids = tokenizer.encode("ok", bos=True, eos=True)
    assert (ids[0], ids[-1], tokenizer.bos_id, tokenizer.eos_id) == (1, 2, 1, 2)


def test_a_vocabulary_that_does_not_fit_the_model_fails(tokenizer):
    with pytest.raises(TokenizerError, match="has 1000 ids but model.vocab_size=512"):
        tokenizer.check_fits(512)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer("/nonexistent/tokenizer.model")


def test_preprocess_jsonl_and_text(tokenizer, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in SAMPLES[:3]))
    (tmp_path / "b.txt").write_text(SAMPLES[3])
    stats = preprocess([tmp_path / "a.jsonl", tmp_path / "b.txt"], tokenizer.path, tmp_path / "shard",
                       json_key="body", workers=2, progress=False)
    shard = Shard(tmp_path / "shard")
    assert shard.n_docs == stats["documents"] == 4 and shard.tokens.dtype == np.uint16
    assert stats["mb_per_s"] > 0 and not list(tmp_path.glob("*.tmp"))
    for i, text in enumerate(SAMPLES[:4]):
        doc = shard.tokens[shard.offsets[i]:shard.offsets[i + 1]]
        assert doc[0] == tokenizer.bos_id and doc[-1] == tokenizer.eos_id and tokenizer.decode(doc[1:-1]) == text
    with pytest.raises(InputError, match=r"a.jsonl:1: no text under key 'text'"):
        preprocess([tmp_path / "a.jsonl"], tokenizer.path, tmp_path / "x", workers=1, progress=False)


def _synthetic(path, n_tokens, vocab=100, value=None, docs=10):
    w = ShardWriter(path, vocab)
    rng = np.random.default_rng(0)
    for chunk in np.array_split(np.arange(n_tokens), docs):
        w.add(np.full(len(chunk), value) if value is not None else rng.integers(0, vocab, len(chunk)))
    w.close()
    return Shard(path)


def test_packing_cuts_overlapping_windows_and_reshuffles_each_epoch(tmp_path):
    shard = ShardWriter(tmp_path / "s", 1000)
    shard.add(np.arange(101))
    shard.close()
    ds = PackedDataset(Shard(tmp_path / "s"), seq_len=10, seed=1)
    assert ds.n_windows == 10
    epoch0 = [ds.window(j) for j in range(10)]
    assert sorted(int(w[0]) for w in epoch0) == list(range(0, 100, 10))
    assert all(len(w) == 11 and np.array_equal(w, np.arange(w[0], w[0] + 11)) for w in epoch0)
    epoch1 = [int(ds.window(j)[0]) for j in range(10, 20)]
    assert sorted(epoch1) == list(range(0, 100, 10)) and epoch1 != [int(w[0]) for w in epoch0]


def _three_sources(tmp_path, seed):
    sources = [PackedDataset(_synthetic(tmp_path / f"s{v}", 2000 * (v + 1), value=v), 8, seed + v, f"s{v}")
               for v in range(3)]
    return Mixture(sources, [0.67, 0.15, 0.18], seed)


def test_mixture_shares_epochs_and_determinism(tmp_path):
    mix = _three_sources(tmp_path, 3)
    picks = np.array([int(mix.sample(i)[0]) for i in range(10_000)])  # each source's tokens are its id
    shares = np.bincount(picks, minlength=3) / len(picks)
    assert np.all(np.abs(shares - [0.67, 0.15, 0.18]) <= 0.01), shares
    assert torch.equal(mix.samples(0, 500), _three_sources(tmp_path, 3).samples(0, 500))
    order = [mix.source_of(i) for i in range(200)]
    assert order != [_three_sources(tmp_path, 4).source_of(i) for i in range(200)]  # the seed matters
    report = mix.epochs(1e6)
    assert [r["epochs"] for r in report] == pytest.approx([0.67e6 / 2000, 0.15e6 / 4000, 0.18e6 / 6000])
    assert "s2" in epoch_report(mix, 1e6) and block_counts([0.67, 0.15, 0.18]) == [670, 150, 180]


def test_dp_slices_and_resuming_with_another_dp_read_the_same_stream(tmp_path):
    mix = _three_sources(tmp_path, 5)
    G = 16
    for step in range(3):
        whole = mix.samples(step * G, G)
        for dp in (1, 2, 4):
            assert torch.equal(torch.cat([rank_slice(mix, step * G, G, dp, r) for r in range(dp)]), whole)
    # 5 steps at dp=4, resume at consumed = 5·G with dp=2: the next global batches are unchanged
    consumed = 5 * G
    for step in range(5, 8):
        resumed = torch.cat([rank_slice(mix, consumed, G, 2, r) for r in range(2)])
        assert torch.equal(resumed, torch.cat([rank_slice(mix, step * G, G, 4, r) for r in range(4)]))
        consumed += G


def test_bad_shards_fail_naming_the_file(tmp_path):
    with pytest.raises(ShardError, match=r"shard file '.*missing.idx' does not exist"):
        Shard(tmp_path / "missing")
    _synthetic(tmp_path / "t", 1000)
    raw = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-10])
    with pytest.raises(ShardError, match=r"'.*t.bin' is truncated"):
        Shard(tmp_path / "t")
    _synthetic(tmp_path / "u", 1000)
    (tmp_path / "u.idx").write_bytes((tmp_path / "u.idx").read_bytes()[:-8])
    with pytest.raises(ShardError, match=r"'.*u.idx' is truncated"):
        Shard(tmp_path / "u")
    _synthetic(tmp_path / "v", 1000, vocab=5000, value=4000)
    with pytest.raises(ShardError, match=r"shard '.*v' holds token id 4000, outside model.vocab_size=256"):
        load_mixture([{"path": str(tmp_path / "v")}], 8, 0, vocab_size=256)


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 4097])
def test_the_seeded_permutation_is_a_permutation(n):
    from llama.data import SeededPermutation
    perm = SeededPermutation(n, seed=5)
    order = [perm(i) for i in range(n)]
    assert sorted(order) == list(range(n))
    assert order == [SeededPermutation(n, seed=5)(i) for i in range(n)]  # deterministic
    if n >= 1000:
        assert order != [SeededPermutation(n, seed=6)(i) for i in range(n)]
        assert sum(a == b for a, b in enumerate(order)) < n // 50  # actually shuffled
    with pytest.raises(IndexError):
        perm(n)
