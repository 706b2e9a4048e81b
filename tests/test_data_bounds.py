"""Bounded data: data.max_doc_chars (a huge document is skipped in bounded memory, the checkpointed
state stays small, resume across it is exact) and data statistics summed over ranks."""

from __future__ import annotations

import gzip
import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
from test_data import WordTokenizer, assert_resumes_exactly, doc_text, epoch_documents
from test_train import launch, tiny_overrides

from megamora.config import ConfigError, DataConfig, load_config
from megamora.data import DocumentStream, HubShard, LocalShard, _load_hub_split, build_train_loader
from megamora.metrics import read_metrics

HUGE = 50 * 2**20  # characters (and bytes) of the one-line document


def write_shard(path: Path, before: list[str], after: list[str], huge: int = HUGE) -> int:
    """A json.gz shard: `before`, one document of `huge` characters on one line, `after`; returns the
    huge line's index. Written in 1 MiB pieces: the test never holds the document either."""
    piece = b"7 " * 2**19
    with gzip.open(path, "wb", compresslevel=1) as f:
        for text in before:
            f.write(json.dumps({"text": text, "url": "u"}).encode() + b"\n")
        f.write(b'{"url": "u", "text": "')
        for _ in range(huge // len(piece)):
            f.write(piece)
        f.write(b'"}\n')
        for text in after:
            f.write(json.dumps({"text": text, "url": "u"}).encode() + b"\n")
    return len(before)


def traced_peak(fn):
    """fn()'s result and the peak of Python allocations while it ran (bytes)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_line_is_skipped_and_counted_in_bounded_memory(tmp_path):
    limit = 1000
    at_limit = "\u00e9" * limit  # written as \u00e9 escapes: 6 bytes a character, still read
    before, after = [doc_text(0, 3), at_limit, "8 " * (limit // 2) + "9"], [doc_text(1, 3), doc_text(2, 3)]
    huge_at = write_shard(tmp_path / "c4-train.0.json.gz", before, after)
    files = [tmp_path / "c4-train.0.json.gz"]

    stream = DocumentStream(LocalShard(files, 0, 1, max_doc_chars=limit), stream_id=0, seed=0, buffer_size=0)
    (docs, _), peak = traced_peak(lambda: epoch_documents(stream))
    assert docs == [doc_text(0, 3), at_limit, doc_text(1, 3), doc_text(2, 3)]
    assert stream.counters["skipped_too_long"] == 2  # the huge line, and a limit + 1 character text
    assert sum(v for k, v in stream.counters.items() if k.startswith("skipped_")) == 2
    assert peak < 4 * 2**20, peak  # the 50 MiB line was read in bounded pieces, never whole

    # A position just past the huge line (as a checkpoint holds it) resumes there, also bounded.
    shard = LocalShard(files, 0, 1, max_doc_chars=limit)
    shard.load_state({"pos": 0, "line": huge_at + 1})
    record, peak = traced_peak(shard.next_record)
    assert record == (doc_text(1, 3), None) and peak < 4 * 2**20, peak


def test_state_stays_small_and_resume_is_exact_across_a_huge_line(tmp_path):
    before = [doc_text(i, 5 + 3 * i) for i in range(8)]
    after = [doc_text(10 + i, 4 + 2 * i) for i in range(8)]
    huge_at = write_shard(tmp_path / "c4-train.0.json.gz", before, after)
    cfg = DataConfig(local_dir=str(tmp_path), seq_len=16, shuffle_buffer=3, encode_batch=2)  # default bound

    def make(streams):  # 1 file, 2 streams: split by document, both streams read past the huge line
        return build_train_loader(cfg, WordTokenizer(), stream_ids=streams, num_streams=2, micro_batch_size=2, seed=3)

    loader, lines, cuts = make([0, 1]), [None], [1, 2, 4, 6]
    for _ in range(8):
        for s in (0, 1):
            loader.next_batch(s)
        state = loader.state_dict()
        assert len(json.dumps(state).encode()) < 10_000  # unbounded: 25M pending tokens of the document
        lines.append(state["0"]["docs"]["shard"]["line"])
    stats = loader.stats()
    assert stats["epochs"] >= 1 and stats["skipped_too_long"] >= 2  # once an epoch
    assert stats["docs_skipped"] == stats["skipped_too_long"]
    # cuts before the huge line (the resumed reader meets it) and after it (the resume skips it)
    assert any(0 < lines[k] <= huge_at for k in cuts) and any(lines[k] > huge_at + 1 for k in cuts)
    assert_resumes_exactly(make, [0, 1], cuts, total=8)


def test_hub_mode_skips_the_same_long_texts_as_local_mode(shared_data):
    en = shared_data / "c4-sample" / "en"
    files = {"train": str(en / "c4-train.*.json.gz"), "validation": str(en / "c4-validation.*.json.gz")}
    cfg = DataConfig(dataset="json", dataset_config="", data_files=files, max_doc_chars=2000)
    hub = DocumentStream(HubShard(_load_hub_split(cfg, "train"), 0, 1, 2000), stream_id=0, seed=0, buffer_size=0)
    local_shard = LocalShard(sorted(en.glob("c4-train.*.json.gz")), 0, 1, 2000)
    local = DocumentStream(local_shard, stream_id=0, seed=0, buffer_size=0)
    docs = epoch_documents(hub)[0]
    assert docs == epoch_documents(local)[0] and max(map(len, docs)) <= 2000
    assert hub.counters == local.counters and 0 < hub.counters["skipped_too_long"] < 1000


def test_max_doc_chars_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="data.max_doc_chars=0"):
        load_config(None, [f"run_dir={tmp_path}", "data.max_doc_chars=0"])
    with pytest.raises(ValueError, match="data.max_doc_chars=-1"):
        build_train_loader(DataConfig(local_dir=str(tmp_path), max_doc_chars=-1), WordTokenizer(),
                           stream_ids=[0], num_streams=1, micro_batch_size=1, seed=0)


def test_logged_data_stats_are_summed_over_ranks(shared_data, tmp_path):
    """Each rank's stream meets a bad file and long documents: the 2-rank run logs the totals, which
    are the 1-process run's (the same streams, read by one process)."""
    data = tmp_path / "data"
    data.mkdir()
    sample = sorted((shared_data / "c4-sample" / "en").glob("c4-train.*.json.gz"))
    (data / "c4-train.00000-of-00006.json.gz").write_bytes(b"not gzip\n")  # stream 0's first file
    (data / "c4-train.00001-of-00006.json.gz").write_bytes(sample[0].read_bytes()[:2000])  # stream 1's: cut
    for i, path in enumerate(sample):
        shutil.copy(path, data / f"c4-train.{i + 2:05d}-of-00006.json.gz")
    shutil.copy(shared_data / "c4-sample" / "en" / "c4-validation.00000-of-00001.json.gz", data)

    extra = [f"data.local_dir={data}", "data.shuffle_buffer=0", "data.max_doc_chars=2000", "steps=3",
             "eval_every=0", "save_every=0"]  # 6 files, 2 streams: stream s reads files s, s + 2, s + 4
    launch(tiny_overrides(shared_data, tmp_path / "one", *extra))
    launch(tiny_overrides(shared_data, tmp_path / "two", *extra), nproc=2)
    one, two = read_metrics(tmp_path / "one", "train"), read_metrics(tmp_path / "two", "train")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert [r["data"] for r in two] == [r["data"] for r in one]
    last = two[-1]["data"]
    assert last["skipped_bad_file"] == 2  # one per rank: rank 0 alone would log 1
    assert last["skipped_too_long"] > 0 and last["docs_read"] > 0
    assert last["docs_skipped"] == sum(v for k, v in last.items() if k.startswith("skipped_"))
