"""The t5-base tokenizer: spiece.model and tokenizer.json give the same ids on real C4 text."""

from __future__ import annotations

import difflib
import gzip
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from megamora.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def t5_dir(shared_data) -> Path:
    return shared_data / "tokenizers" / "t5-base"


def c4_texts(shared_data: Path) -> list[str]:
    texts = []
    for path in sorted((shared_data / "c4-sample" / "en").glob("*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


def test_spiece_and_tokenizer_json_agree_on_real_c4(t5_dir, shared_data):
    sp = load_tokenizer(str(t5_dir / "spiece.model"))
    hf = load_tokenizer(str(t5_dir / "tokenizer.json"))
    assert isinstance(sp, SentencePieceTokenizer) and isinstance(hf, HFTokenizer)
    texts = c4_texts(shared_data)
    assert len(texts) == 2000
    a, b = sp.encode_batch(texts), hf.encode_batch(texts)
    assert sum(map(len, a)) > 900_000
    differing = [i for i in range(len(texts)) if a[i] != b[i]]
    # SentencePiece sums float32 scores over the whole document, so a near-tie between two
    # segmentations of a word can round the other way: allow exactly that, nothing else.
    assert len(differing) <= 2, differing
    for i in differing:
        assert sp.decode(a[i]) == sp.decode(b[i])
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a[i], b[i], autojunk=False).get_opcodes():
            if op == "equal":
                continue
            assert sp.decode(a[i][i1:i2]) == sp.decode(b[i][j1:j2])  # the same text, cut differently
            score = sp._sp.get_score
            assert abs(sum(map(score, a[i][i1:i2])) - sum(map(score, b[i][j1:j2]))) < 1e-3


def test_t5_special_ids_and_no_special_tokens_added(t5_dir):
    for name, vocab in (("spiece.model", 32000), ("tokenizer.json", 32100)):
        tok = load_tokenizer(str(t5_dir / name))
        assert isinstance(tok, Tokenizer)
        assert tok.eos_id == 1 and tok.vocab_size == vocab
        ids = tok.encode_batch(["Hello world.", ""])
        assert ids[0] and ids[0][-1] != 1 and ids[1] == []
        assert tok.encode_batch([]) == []


def test_folder_forms(tmp_path, t5_dir):
    assert isinstance(load_tokenizer(str(t5_dir)), HFTokenizer)  # a folder with tokenizer.json
    only_spm = tmp_path / "spm"
    only_spm.mkdir()
    shutil.copy(t5_dir / "spiece.model", only_spm / "spiece.model")
    assert isinstance(load_tokenizer(str(only_spm)), SentencePieceTokenizer)
    with pytest.raises(ValueError, match="neither tokenizer.json nor spiece.model"):
        load_tokenizer(str(tmp_path))


def test_bad_names_are_one_line_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    bad = tmp_path / "broken.json"
    bad.write_text("{not a tokenizer")
    cases = [
        (str(tmp_path / "missing" / "spiece.model"), "tokenizer file not found"),
        ("./nope.json", "tokenizer file not found"),
        (str(bad), "is not a tokenizer.json"),
        ("t5-base", "could not be loaded from the Hub"),
    ]
    for name, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            load_tokenizer(name)
        assert "\n" not in str(e.value) and name in str(e.value)
