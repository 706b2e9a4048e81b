"""The training data read ahead by a background thread (data.prefetch_batches): the same batches, the
same state (the state after the last batch the trainer took, not the reader's), errors surfacing in
the trainer's thread, a thread that stops, and reading that overlaps the step."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time

import pytest
import torch

from megamora.config import ConfigError, DataConfig, load_config
from megamora.data import PrefetchLoader, TrainLoader, build_train_loader
from test_data import WordTokenizer, make_corpus, write_gz
from test_train import crash_after_first_checkpoint, run_in_process, tiny_overrides

THREAD = "megamora-data-prefetch"


def make(tmp_path, streams, num_streams, prefetch, tokenizer=None, **data):
    cfg = DataConfig(local_dir=str(tmp_path), prefetch_batches=prefetch,
                     **{"seq_len": 8, "shuffle_buffer": 3, "encode_batch": 2, **data})
    return build_train_loader(cfg, tokenizer or WordTokenizer(), stream_ids=streams, num_streams=num_streams,
                              micro_batch_size=2, seed=5)


def within(seconds: float, fn, *args):
    """fn(*args), failing the test instead of hanging when it takes longer than `seconds` (on a
    daemon thread: a hung call does not keep pytest from exiting)."""
    out: dict = {}

    def call():
        try:
            out["value"] = fn(*args)
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} hangs (still running after {seconds} s)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD]


def wait_until_read_ahead(loader: PrefetchLoader, timeout: float = 30) -> None:
    """Until every stream's queue is full: the reader is then `depth` batches past what was taken."""
    deadline = time.monotonic() + timeout
    while not all(len(q) == loader._depth for q in loader._reader._ready.values()):
        assert time.monotonic() < deadline, "the reader did not fill its queues"
        time.sleep(0.01)


ORDERS = {
    "in-turn": [0, 1, 2] * 30,  # as the trainer takes them
    "irregular": [1, 1, 0, 2, 2, 2, 0, 1] * 10 + [0] * 12,  # any order works, each stream stays exact
}


@pytest.mark.parametrize("prefetch", [1, 3])
@pytest.mark.parametrize("order", ORDERS.values(), ids=ORDERS.keys())
def test_prefetched_batches_state_and_stats_are_those_of_inline_reading(tmp_path, prefetch, order):
    make_corpus(tmp_path, [8, 5, 9, 6, 7])  # several epochs in 90 batches
    inline, ahead = make(tmp_path, [0, 1, 2], 3, 0), make(tmp_path, [0, 1, 2], 3, prefetch)
    assert isinstance(inline, TrainLoader) and isinstance(ahead, PrefetchLoader)
    for i, s in enumerate(order):
        assert torch.equal(ahead.next_batch(s), inline.next_batch(s)), f"batch {i} (stream {s}) differs"
        if i % 7 == 0:  # the reader is mostly ahead here (made sure of in the next test): the taken state
            assert ahead.state_dict() == inline.state_dict(), f"state after batch {i} differs"
            assert ahead.stats() == inline.stats()
    assert inline.stats()["epochs"] >= 2
    ahead.close()


def test_state_taken_mid_stream_resumes_to_identical_batches(tmp_path):
    make_corpus(tmp_path, [8, 5, 9, 6])
    streams = [0, 1, 2, 3]
    inline = make(tmp_path, streams, 4, 0)
    reference = [[inline.next_batch(s) for s in streams] for _ in range(30)]

    def assert_continues(loader, step):
        for k in range(step, 30):
            for s in streams:
                assert torch.equal(loader.next_batch(s), reference[k][s]), f"step {k}, stream {s} differs"

    first = make(tmp_path, streams, 4, 2)
    for step in range(11):
        for s in streams:
            assert torch.equal(first.next_batch(s), reference[step][s])
    wait_until_read_ahead(first)  # 2 batches per stream read past the state saved below
    state = json.loads(json.dumps(first.state_dict()))
    for prefetch in (2, 0):  # a prefetched state resumes with or without prefetching
        resumed = make(tmp_path, streams, 4, prefetch)
        resumed.load_state_dict(state)
        assert_continues(resumed, 11)
    # The same loader stopped while ahead (closed, or a state loaded while it reads): nothing is lost.
    first.close()
    assert first._reader is None
    assert_continues(first, 11)
    first.load_state_dict(state)
    assert_continues(first, 11)
    first.close()


def make_batches(tmp_path, stream, n):
    loader = make(tmp_path, [stream], 3, 0, seq_len=4)
    return [loader.next_batch(stream) for _ in range(n)]


def test_bad_data_in_the_reader_thread_surfaces_where_it_would_inline(tmp_path):
    make_corpus(tmp_path, [2])  # stream 2 of 3 has no document

    def first_batch(loader):
        loader.next_batch(0)
        return loader.next_batch(2)

    with pytest.raises(ValueError, match="stream 2 has no usable document") as inline:
        first_batch(make(tmp_path, [0, 2], 3, 0, seq_len=4))
    ahead = make(tmp_path, [0, 2], 3, 2, seq_len=4)
    with pytest.raises(ValueError, match="stream 2 has no usable document") as raised:
        within(30, first_batch, ahead)
    assert str(raised.value) == str(inline.value)  # the same one-line error
    with pytest.raises(ValueError, match="stream 2"):  # asked again: the same error, not a hang
        within(30, ahead.next_batch, 2)
    assert torch.equal(within(30, ahead.next_batch, 0), make_batches(tmp_path, 0, 2)[1])  # stream 0 goes on
    ahead.close()


class FailingTokenizer(WordTokenizer):
    """Fails at its `fail_at`-th call, as a tokenizer meeting text it cannot encode would."""

    def __init__(self, fail_at: int):
        self.calls, self.fail_at = 0, fail_at

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"cannot encode document {texts[0][:12]!r}")
        return super().encode_batch(texts)


def test_a_failure_mid_stream_comes_after_the_same_batches_as_inline(tmp_path):
    make_corpus(tmp_path, [30])

    def read_until_error(loader):
        got = []
        with pytest.raises(RuntimeError, match="cannot encode document") as raised:
            while True:
                got.append(loader.next_batch(0))
        return got, str(raised.value)

    inline_batches, inline_error = read_until_error(make(tmp_path, [0], 1, 0, FailingTokenizer(9)))
    ahead = make(tmp_path, [0], 1, 3, FailingTokenizer(9))
    batches, error = within(30, read_until_error, ahead)
    assert error == inline_error and len(batches) == len(inline_batches) > 2
    assert all(torch.equal(a, b) for a, b in zip(batches, inline_batches))
    taken = make(tmp_path, [0], 1, 0)
    for _ in batches:
        taken.next_batch(0)
    assert ahead.state_dict() == taken.state_dict()  # a checkpoint now resumes after the last good batch
    ahead.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA: pinning must fail")
def test_a_failure_of_the_thread_itself_reaches_every_stream(tmp_path):
    make_corpus(tmp_path, [6])
    inner = make(tmp_path, [0, 1], 2, 0)
    loader = PrefetchLoader(inner, 2, pin_memory_device=torch.device("cuda", 0))  # no CUDA: set_device fails
    errors = []
    for s in (0, 1):
        with pytest.raises(Exception) as raised:  # torch's CUDA call fails: the error, not a hang
            within(30, loader.next_batch, s)
        errors.append(raised.value)
    assert errors[0] is errors[1] and "cuda" in "".join(map(str, errors[0].args)).lower() + repr(errors[0]).lower()
    loader.close()


def test_the_thread_ends_at_close_and_when_the_loader_is_dropped(tmp_path):
    make_corpus(tmp_path, [8, 5])
    before = set(reader_threads())
    loader = make(tmp_path, [0, 1], 2, 2)
    assert set(reader_threads()) <= before  # not started until the first batch (a state loads first)
    loader.next_batch(0)
    wait_until_read_ahead(loader)  # the thread now waits for room
    thread = loader._reader._thread
    within(30, loader.close)
    assert not thread.is_alive()
    dropped = make(tmp_path, [0, 1], 2, 2)
    dropped.next_batch(1)
    thread = dropped._reader._thread
    del dropped
    gc.collect()
    thread.join(30)
    assert not thread.is_alive() and set(reader_threads()) <= before


def test_batches_are_pinned_only_for_a_cuda_device(tmp_path):
    make_corpus(tmp_path, [6])
    cpu = make(tmp_path, [0], 1, 2)
    assert cpu._pin_device is None and not cpu.next_batch(0).is_pinned()
    cfg = DataConfig(local_dir=str(tmp_path), seq_len=8, prefetch_batches=2)
    on_cpu = build_train_loader(cfg, WordTokenizer(), stream_ids=[0], num_streams=1, micro_batch_size=2, seed=0,
                                pin_memory_device=torch.device("cpu"))
    assert on_cpu._pin_device is None
    if torch.cuda.is_available():  # the GPU check runs this branch
        gpu = build_train_loader(cfg, WordTokenizer(), stream_ids=[0], num_streams=1, micro_batch_size=2, seed=0,
                                 pin_memory_device=torch.device("cuda", 0))
        assert gpu.next_batch(0).is_pinned()
        gpu.close()
    cpu.close()
    on_cpu.close()


class SlowTokenizer(WordTokenizer):
    """A tokenizer that takes `seconds` per call and does not hold the GIL while it works, as
    SentencePiece's C++ encoding does not."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def encode_batch(self, texts):
        time.sleep(self.seconds)
        return super().encode_batch(texts)


def test_reading_overlaps_the_step(tmp_path):
    # One encode call per batch (a 15-token document + EOS = one batch of 2 x 8 tokens), a step as
    # long as the call: inline costs their sum, prefetched about the larger one. Sleeps, not work,
    # so a busy machine does not change the bound.
    docs = [" ".join(str(1000 * d + k) for k in range(15)) for d in range(40)]
    write_gz(tmp_path / "c4-train.0.json.gz", [json.dumps({"text": t}).encode() for t in docs])
    tick, n = 0.04, 25

    def consume(loader):
        t0 = time.perf_counter()
        batches = []
        for _ in range(n):
            batches.append(loader.next_batch(0))
            time.sleep(tick)  # the training step
        return time.perf_counter() - t0, batches

    inline_s, inline = consume(make(tmp_path, [0], 1, 0, SlowTokenizer(tick), shuffle_buffer=0, encode_batch=1))
    ahead = make(tmp_path, [0], 1, 2, SlowTokenizer(tick), shuffle_buffer=0, encode_batch=1)
    ahead_s, batches = consume(ahead)
    ahead.close()
    assert all(torch.equal(a, b) for a, b in zip(batches, inline))
    assert inline_s >= 2 * n * tick  # every call and every step, one after the other
    assert ahead_s < 0.75 * 2 * n * tick, (inline_s, ahead_s)  # ~ (n + 2) * tick: they overlap


def test_prefetch_batches_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="data.prefetch_batches=-1 must be >= 0"):
        load_config(None, [f"run_dir={tmp_path}", "data.prefetch_batches=-1"])
    make_corpus(tmp_path, [2])
    with pytest.raises(ValueError, match="data.prefetch_batches=-2 must be >= 0"):
        make(tmp_path, [0], 1, -2)


def test_runs_are_the_same_with_and_without_prefetch_and_resume_across(shared_data, tmp_path, monkeypatch):
    built, init = [], PrefetchLoader.__init__  # held here: only close() can end their threads

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(PrefetchLoader, "__init__", record)
    inline = run_in_process(tiny_overrides(shared_data, tmp_path / "inline", "data.prefetch_batches=0"))
    ahead = run_in_process(tiny_overrides(shared_data, tmp_path / "ahead", "data.prefetch_batches=3"))
    assert ahead.losses == inline.losses and ahead.final_eval == inline.final_eval  # bitwise
    shutil.copytree(tmp_path / "ahead", tmp_path / "resumed")
    crash_after_first_checkpoint(tmp_path / "resumed")  # its step-3 checkpoint, saved while reading ahead
    resumed = run_in_process(tiny_overrides(shared_data, tmp_path / "resumed", "data.prefetch_batches=0"))
    assert resumed.resumed_from.name == "step_00000003"  # the setting may change on resume
    assert resumed.losses == inline.losses[3:] and resumed.final_eval == inline.final_eval
    assert len(built) == 1 and built[0]._reader is None  # pretrain closed the loader it built


def test_prefetch_depth_unset_reads_ahead_for_cuda_only():
    """Unset, the reader runs ahead only where the step runs on a GPU: on a CPU it competes with the
    step for the cores (slower, benchmarks/bench_data.py --step matmul); set, it is what was asked."""
    import torch

    from megamora.data import prefetch_depth

    assert prefetch_depth(DataConfig(), torch.device("cuda", 0)) == 2
    assert prefetch_depth(DataConfig(), torch.device("cpu")) == 0
    assert prefetch_depth(DataConfig(), None) == 0
    assert prefetch_depth(DataConfig(prefetch_batches=3), torch.device("cpu")) == 3
    assert prefetch_depth(DataConfig(prefetch_batches=0), torch.device("cuda", 0)) == 0
