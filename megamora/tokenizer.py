"""The t5-base tokenizer, from a local SentencePiece model, a local tokenizer.json, or the Hub.

Both local forms give the same ids: `spiece.model` (32000 pieces, about 5x faster here) and the
Hugging Face `tokenizer.json` (the same pieces plus 100 `<extra_id_*>` sentinels, 32100 entries).
Two known differences, both rare on C4:
- SentencePiece sums piece scores in float32 over the whole document, so where two segmentations
  of a word score within ~1e-3 of each other the rounding can pick the other one (1 word in ~1M
  tokens of the C4 sample; see tests/test_tokenizer.py);
- `tokenizers` matches special-token strings written in the text ("</s>", "<pad>", "<extra_id_0>")
  as those tokens; SentencePiece encodes them as plain text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

# Names under which Hugging Face tokenizers keep their end-of-document token, in order of preference.
_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


@runtime_checkable
class Tokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without any special token added."""
        ...


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; batches are encoded on `num_threads` C++ threads."""

    def __init__(self, path: str | Path, num_threads: int):
        import sentencepiece

        self.path = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self._num_threads = num_threads  # -1 would be every core of the machine, in every rank
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path!r} defines no EOS piece")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self._sp.encode(list(texts), num_threads=self._num_threads)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (a tokenizer.json file or a Hub name)."""

    def __init__(self, tok, name: str):
        self.name = name
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = [tok.token_to_id(t) for t in _EOS_TOKENS]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"tokenizer {name!r} has none of the EOS tokens {list(_EOS_TOKENS)}")
        self.eos_id = found[0]
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets we do not use.
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self._encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "org/name"; anything else that does not exist locally is a typo'd path.
    return (
        name.endswith((".model", ".json"))
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
    )


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_tokenizer(name_or_path: str, num_threads: int | None = None) -> Tokenizer:
    """A tokenizer from a `.model` file, a tokenizer.json (or a folder holding one), or a Hub name,
    encoding on `num_threads` threads (None: this rank's share of the CPUs, cpus_per_rank; -1: every
    core of the machine, what both libraries do by default)."""
    import tokenizers

    from megamora.distributed import cpus_per_rank

    if num_threads is None:
        num_threads = cpus_per_rank()
    if num_threads < 1 and num_threads != -1:
        raise ValueError(f"tokenizer num_threads={num_threads} must be positive (or -1: all cores)")
    if num_threads > 0:
        # Hugging Face tokenizers encode batches on Rayon's global pool, sized once from this
        # variable at its first use (default: every core); a value the user set is kept.
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "spiece.model").is_file():
            path = path / "spiece.model"
        else:
            raise ValueError(f"tokenizer folder {name!r} holds neither tokenizer.json nor spiece.model")
    if path.is_file():
        if path.suffix == ".model":
            return SentencePieceTokenizer(path, num_threads=num_threads)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on a bad file
            raise ValueError(f"tokenizer file {name!r} is not a tokenizer.json: {_one_line(e)}") from None
        return HFTokenizer(tok, name)
    if _looks_like_path(name):
        raise ValueError(f"tokenizer file not found: {name!r}")
    try:
        tok = tokenizers.Tokenizer.from_pretrained(name)
    except Exception as e:
        raise ValueError(
            f"tokenizer {name!r} is not a local file and could not be loaded from the Hub "
            f"({_one_line(e)}); offline, point data.tokenizer at a local spiece.model or tokenizer.json"
        ) from None
    return HFTokenizer(tok, name)
