"""A SentencePiece BPE model as Hugging Face's tokenizer files, so that an HF export loads in
`AutoTokenizer`, transformers' pipelines and lm-evaluation-harness unchanged:

    tokenizer.json          the `tokenizers` library's pipeline, as in Meta's Llama 2 release:
                            normaliser Prepend("▁") + Replace(" " → "▁"), no pre-tokeniser, BPE
                            with byte fallback, `<s>` before every sequence
    tokenizer_config.json   add_bos_token true, add_eos_token false, `<unk>`/`<s>`/`</s>`
    special_tokens_map.json the same three tokens, for older transformers
    tokenizer.model         the SentencePiece model itself (a copy)

Written from the SentencePiece model alone (no transformers needed), and token for token what
`llama.tokenizer.Tokenizer.encode(text, bos=True)` gives, text that begins with spaces
included: SentencePiece always adds its dummy-prefix "▁", so " Re" is `▁▁`, `Re`; the
`Metaspace` pre-tokeniser that transformers' own Llama conversion writes adds it only when the
text does not begin with a space already, and gives `▁Re`. The Prepend normaliser adds it always.

`tokenizer_class` is `PreTrainedTokenizerFast`, which every transformers version loads from
tokenizer.json as written. `LlamaTokenizer(Fast)` would not: transformers 5 rebuilds its
pipeline from the vocabulary with that Metaspace, and so moves the tokens of such texts.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama.tokenizer import Tokenizer, TokenizerError

# SentencePiece's ModelProto field numbers (sentencepiece_model.proto)
_TRAINER_SPEC, _NORMALIZER_SPEC = 2, 3
_MODEL_TYPE, _TREAT_WHITESPACE_AS_SUFFIX, _BYTE_FALLBACK = 3, 24, 35  # in TrainerSpec
_NAME, _CHARSMAP, _ADD_DUMMY_PREFIX, _REMOVE_EXTRA_WHITESPACES, _ESCAPE_WHITESPACES = 1, 2, 3, 4, 5  # NormalizerSpec
_BPE = 2
# the proto's defaults, for fields a model leaves out
_TRAINER_DEFAULTS = {_MODEL_TYPE: 1, _TREAT_WHITESPACE_AS_SUFFIX: 0, _BYTE_FALLBACK: 0}
_NORMALIZER_DEFAULTS = {_NAME: b"", _CHARSMAP: b"", _ADD_DUMMY_PREFIX: 1, _REMOVE_EXTRA_WHITESPACES: 1,
                        _ESCAPE_WHITESPACES: 1}

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(data: bytes) -> dict[int, int | bytes]:
    """The last value of each field of one protobuf message (varints and length-delimited
    fields; fixed-width ones skipped): enough to read SentencePiece's two specs without
    protobuf installed."""
    out, i = {}, 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            out[number], i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            out[number], i = data[i:i + size], i + size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")
    return out


def spm_settings(tokenizer: Tokenizer) -> dict:
    """The options of a SentencePiece model that decide how text becomes tokens."""
    model = _fields(tokenizer.sp.serialized_model_proto())
    trainer = _TRAINER_DEFAULTS | _fields(model.get(_TRAINER_SPEC, b""))
    normalizer = _NORMALIZER_DEFAULTS | _fields(model.get(_NORMALIZER_SPEC, b""))
    return {"model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(trainer[_MODEL_TYPE], "unknown"),
            "byte_fallback": bool(trainer[_BYTE_FALLBACK]),
            "treat_whitespace_as_suffix": bool(trainer[_TREAT_WHITESPACE_AS_SUFFIX]),
            "normalization": normalizer[_NAME].decode(), "precompiled_charsmap": bool(normalizer[_CHARSMAP]),
            "add_dummy_prefix": bool(normalizer[_ADD_DUMMY_PREFIX]),
            "remove_extra_whitespaces": bool(normalizer[_REMOVE_EXTRA_WHITESPACES]),
            "escape_whitespaces": bool(normalizer[_ESCAPE_WHITESPACES])}


def _check_expressible(tokenizer: Tokenizer, s: dict) -> None:
    """Refuse what the written pipeline would tokenise differently from SentencePiece."""
    rules = [(s["model_type"] == "bpe", f"it is a {s['model_type']} model, not BPE"),
             (s["normalization"] in ("identity", "") and not s["precompiled_charsmap"],
              f"it normalises text ({s['normalization']!r}); only 'identity' is written"),
             (not s["remove_extra_whitespaces"], "it removes extra whitespace"),
             (s["escape_whitespaces"] and not s["treat_whitespace_as_suffix"],
              "it does not mark spaces as a '▁' prefix")]
    for ok, why in rules:
        if not ok:
            raise TokenizerError(f"tokenizer {str(tokenizer.path)!r} cannot be written as Hugging Face's "
                                 f"tokenizer.json: {why} (LLaMA's and this library's are identity-normalised BPE)")
    for name, want in (("unk", 0), ("bos", 1), ("eos", 2)):
        got = getattr(tokenizer.sp, f"{name}_id")()
        if got != want:
            raise TokenizerError(f"tokenizer {str(tokenizer.path)!r}: {name} id is {got}, not Meta's {want}")


def hf_tokenizer_json(tokenizer: Tokenizer, s: dict) -> dict:
    """tokenizer.json for the `tokenizers` library: the vocabulary in id order, and merges that
    rebuild every merged piece from two pieces, ranked by the merged piece's score as
    SentencePiece's BPE ranks them (ties by id, then by the left piece's length, as
    transformers' own converter writes them). `s`: its spm_settings, checked (check_tokenizer)."""
    sp = tokenizer.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    special = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = {p: i for i, p in enumerate(pieces)
                 if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    for p in mergeable:
        if " " in p:  # tokenizers' merges are "left right" strings
            raise TokenizerError(f"tokenizer {str(tokenizer.path)!r}: piece {p!r} holds a space, which "
                                 "tokenizer.json's merges cannot express")
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-sp.get_score(i), i, cut, f"{left} {right}"))
    merges = [m for *_, m in sorted(ranked)]
    prefix = [{"type": "Prepend", "prepend": "▁"}] if s["add_dummy_prefix"] else []
    bos = pieces[1]
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Sequence", "normalizers": prefix + [
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[0], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": s["byte_fallback"],
                  "vocab": {p: i for i, p in enumerate(pieces)}, "merges": merges},
    }


def hf_tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict:
    unk, bos, eos = (tokenizer.sp.id_to_piece(i) for i in (0, 1, 2))
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
            "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": None,
            "clean_up_tokenization_spaces": False, "model_max_length": max_length, "legacy": True,
            "added_tokens_decoder": {str(i): {"content": p, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                     for i, p in enumerate((unk, bos, eos))}}


def check_tokenizer(path, vocab_size: int) -> tuple[Tokenizer, dict]:
    """The tokenizer at `path` and its settings, checked to be writable as HF's files for a
    model of vocab_size ids (before any weight is written): what write_hf_tokenizer takes."""
    tokenizer = Tokenizer(path)
    tokenizer.check_fits(vocab_size)
    settings = spm_settings(tokenizer)
    _check_expressible(tokenizer, settings)
    return tokenizer, settings


def write_hf_tokenizer(checked: tuple[Tokenizer, dict], out, max_length: int = 2048) -> None:
    """Hugging Face's tokenizer files for a tokenizer `check_tokenizer` passed, in directory `out`."""
    tokenizer, settings = checked
    path = tokenizer.path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.json": hf_tokenizer_json(tokenizer, settings),
             "tokenizer_config.json": hf_tokenizer_config(tokenizer, max_length),
             "special_tokens_map.json": {k: tokenizer.sp.id_to_piece(i)
                                         for k, i in (("bos_token", 1), ("eos_token", 2), ("unk_token", 0))}}
    for name, value in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(out / name)
    if Path(path).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(path, out / "tokenizer.model.tmp")
        (out / "tokenizer.model.tmp").replace(out / "tokenizer.model")
