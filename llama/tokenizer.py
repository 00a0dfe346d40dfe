"""SentencePiece BPE as in the paper: digits split into single tokens, unknown UTF-8 bytes
falling back to byte tokens. Wraps any SentencePiece model, Meta's `tokenizer.model` included
(ids: 0 <unk>, 1 <s>, 2 </s>, as Meta's)."""
from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from llama.inputs import check_file


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.path = check_file(model_path, "tokenizer model", TokenizerError)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except RuntimeError:  # SentencePiece says only "could not parse ModelProto"
            raise TokenizerError(f"tokenizer model {str(self.path)!r} is not a SentencePiece model "
                                 "(truncated, or another kind of file)") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def check_fits(self, vocab_size: int) -> None:
        """A model whose embedding has fewer rows than the tokenizer has ids cannot run."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"the tokenizer {str(self.path)!r} has {self.vocab_size} ids but "
                                 f"model.vocab_size={vocab_size}; set model.vocab_size >= {self.vocab_size}")


def train_tokenizer(texts, model_prefix: str | Path, vocab_size: int = 32000, threads: int = 2) -> Path:
    """Train SentencePiece BPE with the paper's options on an iterable of documents; returns
    the `.model` path. Normalisation is off so that decode(encode(text)) == text."""
    model, failures = io.BytesIO(), []

    def documents():  # SentencePiece turns an error raised here into a RuntimeError of its own text
        try:
            yield from texts
        except Exception as err:
            failures.append(err)
            raise

    try:
        _train(documents(), model, vocab_size, threads)
    except RuntimeError as err:
        if failures:
            raise failures[0] from None
        reason = str(err).split("] ", 1)[-1].strip() or str(err)  # past SentencePiece's source location
        raise TokenizerError(f"cannot train a vocab_size={vocab_size} tokenizer on this input: {reason}") from None
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".model.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return path


def _train(sentences, model_writer, vocab_size: int, threads: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model_writer, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, byte_fallback=True, character_coverage=0.99995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=threads,
        max_sentence_length=1 << 16, train_extremely_large_corpus=False, minloglevel=2)


class ByteTokenizer:
    """UTF-8 bytes as ids 0–255 (the trainer's fallback corpus): no BOS, no EOS."""
    vocab_size, bos_id, eos_id = 256, None, None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def check_fits(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise TokenizerError(f"byte tokens need model.vocab_size >= 256, not {vocab_size}")
