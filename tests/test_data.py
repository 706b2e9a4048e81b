"""The data pipeline: packing, stream split, malformed input, resume, validation, Hub-mode path."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from megamora.config import DataConfig
from megamora.data import (
    DocumentStream,
    HubShard,
    LocalShard,
    _load_hub_split,
    build_train_loader,
    check_data_source,
    pack_windows,
    validation_batches,
)


class WordTokenizer:
    """Tokenizer-free fake: a document is its token ids written as words."""

    eos_id = 1
    vocab_size = 10**9

    def encode_batch(self, texts):
        return [[int(w) for w in t.split()] for t in texts]


def doc_text(doc_id: int, length: int) -> str:
    # Tokens 1000 * doc_id + 2 + k identify their document and their place in it.
    return " ".join(str(1000 * doc_id + 2 + k) for k in range(length))


def write_gz(path: Path, lines: list[bytes]) -> None:
    with gzip.open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def make_corpus(root: Path, docs_per_file: list[int], seed: int = 0, prefix: str = "c4-train") -> list[str]:
    """Files of C4-format records with numbered documents of random lengths; the texts in file order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts, doc_id = [], 0
    for i, n in enumerate(docs_per_file):
        lines = []
        for _ in range(n):
            texts.append(doc_text(doc_id, int(rng.integers(1, 40))))
            record = {"text": texts[-1], "timestamp": "2019-04-25T12:57:54Z", "url": f"u{doc_id}"}
            lines.append(json.dumps(record).encode())
            doc_id += 1
        write_gz(root / f"{prefix}.{i:05d}-of-{len(docs_per_file):05d}.json.gz", lines)
    return texts


def epoch_documents(stream: DocumentStream) -> tuple[list[str], str]:
    """The documents of the stream's current epoch, and the first document of the next one."""
    docs, start = [], stream.epoch
    while True:
        d = stream.next_document()
        if stream.epoch != start:
            return docs, d
        docs.append(d)


def token_stream(texts: list[str]) -> np.ndarray:
    return np.concatenate([np.array([*map(int, t.split()), 1]) for t in texts])


# --------------------------------------------------------------------------- packing


def test_pack_windows_keep_every_token_once_in_order():
    rng = np.random.default_rng(0)
    for _ in range(200):
        seq_len, n = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        tokens = rng.integers(0, 50, size=n * seq_len + 1 + int(rng.integers(0, 30)))
        w = pack_windows(tokens, n, seq_len)
        assert w.shape == (n, seq_len + 1)
        np.testing.assert_array_equal(w[:, :-1].ravel(), tokens[: n * seq_len])  # each token an input once
        np.testing.assert_array_equal(w[:, 1:].ravel(), tokens[1 : n * seq_len + 1])  # and a target once
    with pytest.raises(ValueError):
        pack_windows(np.arange(9), 3, 3)


@pytest.mark.parametrize("seq_len,micro,encode_batch", [(7, 3, 1), (16, 2, 5), (64, 1, 64), (3, 8, 2)])
def test_loader_packs_the_document_stream_in_order_across_epochs(tmp_path, seq_len, micro, encode_batch):
    texts = make_corpus(tmp_path, [9, 4, 7])
    cfg = DataConfig(local_dir=str(tmp_path), seq_len=seq_len, shuffle_buffer=0, encode_batch=encode_batch)
    loader = build_train_loader(cfg, WordTokenizer(), stream_ids=[0], num_streams=1, micro_batch_size=micro, seed=0)
    batches = [loader.next_batch(0) for _ in range(3 * len(token_stream(texts)) // (seq_len * micro) + 2)]
    assert all(b.dtype == torch.int64 and b.shape == (micro, seq_len + 1) for b in batches)
    windows = torch.cat(batches).numpy()
    expected = np.tile(token_stream(texts), 4)  # shuffle off: every epoch is the files in order, EOS after each doc
    n = len(windows) * seq_len
    np.testing.assert_array_equal(windows[:, :-1].ravel(), expected[:n])
    np.testing.assert_array_equal(windows[:, 1:].ravel(), expected[1 : n + 1])
    assert loader.stats()["epochs"] >= 2 and loader.stats()["tokens"] == n


def test_windows_do_not_depend_on_micro_batch_or_encode_batch(tmp_path):
    make_corpus(tmp_path, [10, 10])

    def windows(micro, encode_batch, steps):
        cfg = DataConfig(local_dir=str(tmp_path), seq_len=8, shuffle_buffer=4, encode_batch=encode_batch)
        loader = build_train_loader(cfg, WordTokenizer(), stream_ids=[0], num_streams=1, micro_batch_size=micro, seed=3)
        return torch.cat([loader.next_batch(0) for _ in range(steps)])

    torch.testing.assert_close(windows(4, 3, 30), windows(1, 64, 120), rtol=0, atol=0)


# --------------------------------------------------------------------------- stream split


@pytest.mark.parametrize("num_streams", [1, 2, 3, 4])
@pytest.mark.parametrize("buffer", [0, 5])
def test_streams_are_disjoint_and_complete(tmp_path, num_streams, buffer):
    # 4 files: 1, 2 and 4 streams shard by file, 3 streams by document.
    texts = make_corpus(tmp_path, [13, 7, 11, 9])
    files = sorted(tmp_path.glob("*.json.gz"))
    seen: list[str] = []
    for s in range(num_streams):
        stream = DocumentStream(LocalShard(files, s, num_streams), stream_id=s, seed=1, buffer_size=buffer)
        first, nxt = epoch_documents(stream)
        second, _ = epoch_documents(stream)
        assert sorted(first) == sorted([nxt] + second)  # every epoch is the same shard
        if buffer and len(first) > 3:
            assert first != [t for t in texts if t in set(first)]  # shuffled
            assert first != [nxt] + second  # reshuffled per epoch
        seen += first
    assert len(seen) == len(set(seen)) == len(texts)  # no document twice, none lost
    assert sorted(seen) == sorted(texts)


def test_streams_are_independent_of_the_process_layout(tmp_path):
    # One process reading all 4 streams sees what two ranks reading 2 streams each see.
    make_corpus(tmp_path, [13, 7, 11])
    cfg = DataConfig(local_dir=str(tmp_path), seq_len=8, shuffle_buffer=6, encode_batch=3)
    kw = dict(num_streams=4, micro_batch_size=2, seed=5)
    one = build_train_loader(cfg, WordTokenizer(), stream_ids=[0, 1, 2, 3], **kw)
    ranks = [build_train_loader(cfg, WordTokenizer(), stream_ids=ids, **kw) for ids in ([0, 2], [1, 3])]
    for _ in range(20):
        for s in range(4):
            assert torch.equal(one.next_batch(s), ranks[s % 2].next_batch(s))


def test_too_many_streams_for_the_data_is_a_clear_error(tmp_path):
    make_corpus(tmp_path, [2])
    cfg = DataConfig(local_dir=str(tmp_path), seq_len=4)
    loader = build_train_loader(cfg, WordTokenizer(), stream_ids=[2], num_streams=3, micro_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="stream 2 has no usable document"):
        loader.next_batch(2)


# --------------------------------------------------------------------------- malformed input


def test_malformed_records_are_skipped_and_counted(tmp_path):
    good = [doc_text(i, 3) for i in range(4)]
    lines = [
        json.dumps({"text": good[0], "timestamp": "t", "url": "u"}).encode(),
        b"not json at all",
        b'{"text": "1 2',  # truncated JSON
        b"",  # blank line
        b'{"url": "missing text"}',
        b'{"text": 5}',
        b"[1, 2]",
        b'{"text": ""}',
        b'{"text": "  \\n\\t "}',
        b'{"text": "caf\xe9 3"}',  # latin-1 byte: not UTF-8
        b'{"text": "\\ud800 3"}',  # lone surrogate
        json.dumps({"text": good[1], "url": "u", "date": "2019-01-01"}).encode(),  # the fixtures' schema
    ]
    write_gz(tmp_path / "c4-train.0.json.gz", lines)
    # A truncated gzip: the lines before the cut are read, the rest of the file is one bad_file.
    payload = gzip.compress(b"".join(json.dumps({"text": doc_text(100 + i, 50)}).encode() + b"\n" for i in range(200)))
    (tmp_path / "c4-train.1.json.gz").write_bytes(payload[: len(payload) // 2])
    (tmp_path / "c4-train.2.json.gz").write_bytes(b"this is not gzip\n")
    write_gz(tmp_path / "c4-train.3.json.gz", [json.dumps({"text": t}).encode() for t in good[2:]])

    files = sorted(tmp_path.glob("*.json.gz"))
    stream = DocumentStream(LocalShard(files, 0, 1), stream_id=0, seed=0, buffer_size=0)
    docs, _ = epoch_documents(stream)
    c = stream.counters
    assert {k: v for k, v in c.items() if k != "docs_read"} == {
        "skipped_bad_utf8": 2,
        "skipped_bad_json": 3,
        "skipped_no_text": 3,
        "skipped_empty_text": 2,
        "skipped_bad_file": 2,
        "skipped_too_long": 0,
    }
    truncated = [d for d in docs if d not in good]
    assert 0 < len(truncated) < 200 and truncated == [doc_text(100 + i, 50) for i in range(len(truncated))]
    assert [d for d in docs if d in good] == good
    assert c["docs_read"] == len(docs) + 1  # + the first document of the next epoch

    # Split by document over 3 streams: each bad line belongs to exactly one stream (a bad file is
    # met by every stream that reads it).
    totals = dict.fromkeys(c, 0)
    for k in range(3):
        shard = LocalShard(files, k, 3)
        while (record := shard.next_record()) is not None:
            key = f"skipped_{record[1]}" if record[1] else "docs_read"
            totals[key] = totals.get(key, 0) + 1
    assert totals.pop("skipped_bad_file") == 3 * c["skipped_bad_file"]
    assert totals == {k: v for k, v in c.items() if k != "skipped_bad_file"} | {"docs_read": c["docs_read"] - 1}

    # The loader reports the counts (summed over its streams) and their total.
    cfg = DataConfig(local_dir=str(tmp_path), seq_len=4, shuffle_buffer=0, encode_batch=1)
    loader = build_train_loader(cfg, WordTokenizer(), stream_ids=[0], num_streams=1, micro_batch_size=1, seed=0)
    for _ in range(3):
        loader.next_batch(0)
    stats = loader.stats()
    assert stats["skipped_bad_json"] == 3 and stats["skipped_no_text"] == 3 and stats["skipped_empty_text"] == 2
    assert stats["skipped_bad_utf8"] == 2
    assert stats["docs_skipped"] == sum(v for k, v in stats.items() if k.startswith("skipped_")) == 10


def test_other_schema_fixtures_are_read(shared_data):
    cfg = DataConfig(local_dir=str(shared_data / "c4-fixtures"), train_glob="c4-sample.*.json.gz")
    files = sorted(Path(cfg.local_dir).glob(cfg.train_glob))
    stream = DocumentStream(LocalShard(files, 0, 1), stream_id=0, seed=0, buffer_size=0)
    docs, _ = epoch_documents(stream)
    assert len(docs) == 30 and stream.counters["docs_read"] == 31  # + the first of the next epoch
    assert sum(v for k, v in stream.counters.items() if k.startswith("skipped_")) == 0


# --------------------------------------------------------------------------- resume


def run(loader, streams, steps):
    return [[loader.next_batch(s) for s in streams] for _ in range(steps)]


def assert_resumes_exactly(make_loader, streams, cut_points, total):
    ref_loader = make_loader(streams)
    reference, epochs = [], []
    for _ in range(total):
        reference.append([ref_loader.next_batch(s) for s in streams])
        epochs.append(ref_loader.stats()["epochs"])
    for k in cut_points:
        first = make_loader(streams)
        run(first, streams, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make_loader(streams)
        resumed.load_state_dict(state)
        for step in range(k, total):
            for b, ref in zip([resumed.next_batch(s) for s in streams], reference[step]):
                assert torch.equal(b, ref), f"cut at {k}: step {step} differs"
        assert resumed.stats() == ref_loader.stats()
    return epochs


def test_resume_is_exact_across_epochs_with_shuffle(tmp_path):
    make_corpus(tmp_path, [8, 5, 9, 6, 7])  # 5 files, 3 streams: split by document

    def make(streams):
        cfg = DataConfig(local_dir=str(tmp_path), seq_len=16, shuffle_buffer=4, encode_batch=3)
        return build_train_loader(cfg, WordTokenizer(), stream_ids=streams, num_streams=3, micro_batch_size=3, seed=7)

    # A cut after every step: mid-epoch, while the buffer drains at the end of a shard, and just after.
    epochs = assert_resumes_exactly(make, [0, 1, 2], range(40), total=40)
    assert epochs[-1] >= 3


def test_state_from_two_ranks_resumes_on_one(tmp_path):
    make_corpus(tmp_path, [8, 5, 9, 6])  # 4 files, 4 streams: split by file

    def make(streams):
        cfg = DataConfig(local_dir=str(tmp_path), seq_len=8, shuffle_buffer=3, encode_batch=2)
        return build_train_loader(cfg, WordTokenizer(), stream_ids=streams, num_streams=4, micro_batch_size=2, seed=1)

    reference = run(make([0, 1, 2, 3]), [0, 1, 2, 3], 30)
    ranks = [make([0, 2]), make([1, 3])]
    for _ in range(17):
        for s in range(4):
            ranks[s % 2].next_batch(s)
    merged = json.loads(json.dumps({**ranks[0].state_dict(), **ranks[1].state_dict()}))
    single = make([0, 1, 2, 3])
    single.load_state_dict(merged)
    for got, want in zip(run(single, [0, 1, 2, 3], 13), reference[17:]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_resume_is_exact_on_the_real_sample_with_the_real_tokenizer(shared_data):
    from megamora.tokenizer import load_tokenizer

    data = shared_data
    tok = load_tokenizer(str(data / "tokenizers" / "t5-base" / "spiece.model"))
    cfg = DataConfig(local_dir=str(data / "c4-sample" / "en"), seq_len=256, shuffle_buffer=50, encode_batch=16)

    def make(streams):
        return build_train_loader(cfg, tok, stream_ids=streams, num_streams=2, micro_batch_size=8, seed=0)

    probe = make([0])
    steps = 0
    while probe.stats()["epochs"] == 0:
        probe.next_batch(0)
        steps += 1
    epochs = assert_resumes_exactly(make, [0, 1], [40, steps - 1], total=steps + 5)
    assert epochs[-1] == 1


def test_state_from_another_configuration_is_refused(tmp_path):
    make_corpus(tmp_path, [5, 5])
    cfg = DataConfig(local_dir=str(tmp_path), seq_len=8)
    a = build_train_loader(cfg, WordTokenizer(), stream_ids=[0], num_streams=2, micro_batch_size=1, seed=0)
    a.next_batch(0)
    b = build_train_loader(cfg, WordTokenizer(), stream_ids=[0], num_streams=2, micro_batch_size=1, seed=1)
    with pytest.raises(ValueError, match="seed=0"):
        b.load_state_dict(a.state_dict())
    c = build_train_loader(cfg, WordTokenizer(), stream_ids=[1], num_streams=2, micro_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="no entry for stream 1"):
        c.load_state_dict(a.state_dict())


# --------------------------------------------------------------------------- validation


def test_validation_is_the_first_tokens_in_order_and_deterministic(tmp_path):
    texts = make_corpus(tmp_path, [6, 6], prefix="c4-validation")
    make_corpus(tmp_path, [3], prefix="c4-train")
    cfg = DataConfig(local_dir=str(tmp_path), seq_len=10, shuffle_buffer=100, encode_batch=4, validation_pieces=1)
    v = validation_batches(cfg, WordTokenizer(), 95)
    assert v.shape == (9, 11) and v.dtype == torch.int64
    expected = token_stream(texts)
    np.testing.assert_array_equal(v[:, :-1].ravel().numpy(), expected[:90])
    np.testing.assert_array_equal(v[:, 1:].ravel().numpy(), expected[1:91])
    assert torch.equal(v, validation_batches(cfg, WordTokenizer(), 95))
    assert validation_batches(cfg, WordTokenizer(), 3).shape == (1, 11)
    with pytest.raises(ValueError, match="validation split holds"):
        validation_batches(cfg, WordTokenizer(), len(expected) + 10)


def test_validation_on_the_real_sample(shared_data):
    from megamora.tokenizer import load_tokenizer

    data = shared_data
    tok = load_tokenizer(str(data / "tokenizers" / "t5-base" / "spiece.model"))
    cfg = DataConfig(local_dir=str(data / "c4-sample" / "en"), seq_len=512)
    stats: dict[str, int] = {}
    v = validation_batches(cfg, tok, 20_000, stats=stats)
    assert v.shape == (39, 513) and torch.equal(v, validation_batches(cfg, tok, 20_000))
    with gzip.open(data / "c4-sample" / "en" / "c4-validation.00000-of-00001.json.gz", "rt") as f:
        first = json.loads(f.readline())["text"]
    ids = tok.encode_batch([first])[0] + [tok.eos_id]
    n = min(len(ids), 512)
    assert v[0, :n].tolist() == ids[:n]
    assert stats["docs_read"] > 0 and not any(k.startswith("skipped_") for k in stats)


# --------------------------------------------------------------------------- errors


def test_check_data_source_names_the_bad_setting(tmp_path):
    make_corpus(tmp_path, [2])
    check_data_source(DataConfig(local_dir=str(tmp_path), validation_glob="c4-train.*.json.gz"))
    cases = [
        (DataConfig(local_dir=str(tmp_path / "nope")), "data.local_dir="),
        (DataConfig(local_dir=str(tmp_path)), "data.validation_glob='c4-validation"),
        (DataConfig(local_dir=str(tmp_path), train_glob="*.parquet"), "data.train_glob='\\*.parquet'"),
        (DataConfig(dataset="json", data_files={"train": str(tmp_path / "x*.gz")}), "data.data_files.train="),
    ]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            check_data_source(cfg)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="stream_ids"):
        build_train_loader(DataConfig(local_dir=str(tmp_path)), WordTokenizer(), stream_ids=[2], num_streams=2,
                           micro_batch_size=1, seed=0)


# --------------------------------------------------------------------------- Hub mode (offline, json builder)


def hub_cfg(shared_data: Path, **kw) -> DataConfig:
    """Hub mode pointed at the local sample through the `json` builder (no network)."""
    en = shared_data / "c4-sample" / "en"
    files = {"train": str(en / "c4-train.*.json.gz"), "validation": str(en / "c4-validation.*.json.gz")}
    return DataConfig(local_dir=None, dataset="json", dataset_config="", data_files=files, **kw)


class HashTokenizer:
    """Fake tokenizer for real text: one id per whitespace-separated word."""

    eos_id = 1
    vocab_size = 1000

    def encode_batch(self, texts):
        return [[2 + sum(map(ord, w)) % 997 for w in t.split()] for t in texts]


def test_hub_mode_split_resume_and_validation(shared_data):
    cfg = hub_cfg(shared_data, seq_len=64, shuffle_buffer=8, encode_batch=8)
    local = dataclasses.replace(cfg, local_dir=str(shared_data / "c4-sample" / "en"))
    local_files = sorted(Path(local.local_dir).glob(local.train_glob))
    all_docs, _ = epoch_documents(DocumentStream(LocalShard(local_files, 0, 1), stream_id=0, seed=0, buffer_size=0))

    base = _load_hub_split(cfg, "train")
    for n in (2, 3):  # 4 shards: split by shard, then one example in 3
        seen = []
        for s in range(n):
            seen += epoch_documents(DocumentStream(HubShard(base, s, n), stream_id=s, seed=0, buffer_size=8))[0]
        assert len(seen) == 1000 and sorted(seen) == sorted(all_docs)

    def make(streams):
        return build_train_loader(cfg, HashTokenizer(), stream_ids=streams, num_streams=3, micro_batch_size=4, seed=2)

    assert_resumes_exactly(make, [0, 1, 2], [5], total=12)
    v = validation_batches(cfg, HashTokenizer(), 1000)
    assert torch.equal(v, validation_batches(local, HashTokenizer(), 1000))  # the same tokens as local mode


def test_hub_mode_single_stream_resumes_across_epochs(shared_data):
    cfg = hub_cfg(shared_data, seq_len=2048, shuffle_buffer=4, encode_batch=64)

    def make(streams):
        return build_train_loader(cfg, HashTokenizer(), stream_ids=streams, num_streams=1, micro_batch_size=16, seed=2)

    epochs = assert_resumes_exactly(make, [0], [9], total=25)  # an epoch is 11 steps
    assert epochs[8] == 0 and epochs[-1] == 2
