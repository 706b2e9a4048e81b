"""Token streams for training and validation, from C4-format JSON lines (local files or the Hub).

One training stream is a pipeline of small resumable stages:

    shard of the corpus ─► malformed records skipped and counted ─► seeded shuffle buffer
        ─► tokenize `encode_batch` documents per call, EOS after each document
        ─► windows of seq_len + 1 tokens with stride seq_len

Window k is tokens[k*seq_len : k*seq_len + seq_len + 1]: the last target of a sequence is the
first input of the next, so every token is an input once and a target once, in order, with no
padding. Windows do not depend on how many are taken per call, nor on `encode_batch`.

Streams. The corpus is cut into `num_streams` disjoint shards that together cover it. The trainer
uses num_streams = world_size * grad_accum_steps and reads stream a * world_size + rank at
micro-step a, so the global batch does not depend on the world size.
- Local mode (`local_dir` set): the files matched by the glob, sorted by name. When their number is
  a multiple of num_streams, stream s reads files s, s + N, s + 2N, ... (each stream decompresses
  only its own files: what the 1024 C4 shards need at scale); otherwise every stream reads every
  file and keeps line j of file i when (i + j) % N == s. Lines are counted raw (malformed ones
  included), so a malformed line belongs to exactly one stream and is counted once.
- Hub mode: `datasets.distributed.split_dataset_by_node` (by shard when n_shards % N == 0, else
  one example in N).

Epochs. When a shard is exhausted (and the shuffle buffer drained) the stream starts again,
reshuffled: the buffer's generator and, in local mode, the order of the stream's files are seeded
from (seed, stream_id, epoch). shuffle_buffer = 0 keeps the stored order in every epoch.

Resume. `TrainLoader.state_dict()` holds, per stream, the reader position, the shuffle buffer's
documents and generator state, the tokens not yet emitted and the counters, all JSON-serialisable;
a loader restored from it yields exactly the batches the uninterrupted loader would have. It stays
bounded whatever the input: documents longer than data.max_doc_chars are skipped (in local mode a
line is never read whole past line_byte_limit()), so the buffer holds at most shuffle_buffer of them
and the pending tokens come from at most one `encode_batch` of them (see TokenPacker).

Malformed input (local mode) is skipped and counted by reason, see SKIP_REASONS.

Prefetch. With data.prefetch_batches = N > 0 the loader is a PrefetchLoader: one background thread
reads, tokenizes and packs up to N batches ahead per stream (into pinned memory when the batches go
to a CUDA device), so the trainer's thread only takes ready tensors. Each batch travels with its
stream's state after it, and state_dict() / stats() are those of the last batch the trainer TOOK,
not the reader's position ahead of it: the batches, checkpoints and counters are those of N = 0.
"""

from __future__ import annotations

import base64
import bisect
import collections
import gzip
import hashlib
import itertools
import json
import threading
import weakref
import zlib
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from megamora.config import DataConfig

STATE_VERSION = 1

# Why a record was skipped (counted in stats() as "skipped_<reason>"):
#   bad_utf8    the line is not valid UTF-8 (or its text holds lone surrogates)
#   bad_json    the line is not JSON (blank lines included)
#   no_text     not a JSON object, or `text` missing or not a string
#   empty_text  `text` is empty or only whitespace
#   bad_file    a file could not be opened or decompressed: the rest of that file is skipped (counted
#               by each stream that reads the file: with the split by document, all of them)
#   too_long    `text` has more than data.max_doc_chars characters, or (local mode) the raw line has
#               more than line_byte_limit(max_doc_chars) bytes and is dropped unparsed
SKIP_REASONS = ("bad_utf8", "bad_json", "no_text", "empty_text", "bad_file", "too_long")

Record = tuple[Optional[str], Optional[str]]  # (text, None) or (None, skip reason)


# --------------------------------------------------------------------------- records


def record_text(record: object, max_chars: int) -> Record:
    """The usable `text` of one parsed record; any other fields (url, timestamp, date) are ignored."""
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        return None, "no_text"
    if len(text) > max_chars:
        return None, "too_long"
    if not text.strip():
        return None, "empty_text"
    try:
        text.encode("utf-8")  # json.loads lets "\ud800" escapes through; tokenizers reject them
    except UnicodeEncodeError:
        return None, "bad_utf8"
    return text, None


def parse_line(raw: bytes | None, max_chars: int) -> Record:
    if raw is None:  # longer than the byte limit: dropped by read_line
        return None, "too_long"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "bad_utf8"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None, "bad_json"
    return record_text(record, max_chars)


# --------------------------------------------------------------------------- shards


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def line_byte_limit(max_doc_chars: int) -> int:
    """Bytes a raw line may have: 12 a character, the most JSON spends on one (UTF-8 takes at most 4,
    a \\uXXXX escape 6, an escaped surrogate pair 12 for one character beyond the BMP), plus 64 KiB
    for the other fields (url, timestamp). So only a text over the bound, or absurd other fields, can
    make a line longer, and the line is then dropped without being parsed."""
    return 12 * max_doc_chars + (1 << 16)


_DROP_CHUNK = 1 << 20


def read_line(fh, limit: int) -> bytes | None:
    """The next raw line (b"" at the end of the file), or None for a line of more than `limit`
    bytes (newline included): its rest is then read and dropped in bounded chunks, never held whole."""
    raw = fh.readline(limit)
    if len(raw) < limit or raw.endswith(b"\n"):
        return raw
    longer = False
    while chunk := fh.readline(min(limit, _DROP_CHUNK)):
        longer = True
        if chunk.endswith(b"\n"):
            break
    return None if longer else raw


class LocalShard:
    """One stream's share of sorted local JSON-lines files (gzip or plain), with a resumable position."""

    def __init__(self, files: list[Path], stream_id: int, num_streams: int,
                 max_doc_chars: int = DataConfig.max_doc_chars):
        self.files = files
        self.stream_id = stream_id
        self.num_streams = num_streams
        self.max_doc_chars = max_doc_chars
        self.line_limit = line_byte_limit(max_doc_chars)
        self.by_file = len(files) % num_streams == 0
        self.own = [i for i in range(len(files)) if not self.by_file or i % num_streams == stream_id]
        self.order = list(self.own)
        self.pos = 0  # index into self.order
        self.line = 0  # raw lines consumed from the current file
        self._fh = None

    def start_epoch(self, rng: np.random.Generator | None) -> None:
        self.close()
        self.pos, self.line = 0, 0
        perm = rng.permutation(len(self.own)) if rng is not None else range(len(self.own))
        self.order = [self.own[k] for k in perm]

    def next_record(self) -> Record | None:
        """The next record of the shard, or None once it is exhausted."""
        while self.pos < len(self.order):
            i = self.order[self.pos]
            try:
                if self._fh is None:
                    self._fh = _open_binary(self.files[i])
                    for _ in range(self.line):  # resume: skip what was read (too long lines included)
                        read_line(self._fh, self.line_limit)
                raw = read_line(self._fh, self.line_limit)
            except (OSError, EOFError, zlib.error):
                self._next_file()
                return None, "bad_file"
            if raw == b"":
                self._next_file()
                continue
            j = self.line
            self.line += 1  # a dropped line is a line too: positions stay those of the raw file
            if self.by_file or (i + j) % self.num_streams == self.stream_id:
                return parse_line(raw, self.max_doc_chars)
        return None

    def _next_file(self) -> None:
        self.close()
        self.pos += 1
        self.line = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def state(self) -> dict:
        return {"pos": self.pos, "line": self.line}

    def load_state(self, state: dict) -> None:
        self.close()
        self.pos, self.line = int(state["pos"]), int(state["line"])


class HubShard:
    """One stream's share of a streamed `datasets.IterableDataset`, resumed by its own state_dict()."""

    def __init__(self, dataset, stream_id: int, num_streams: int, max_doc_chars: int = DataConfig.max_doc_chars):
        self._base = dataset
        self.stream_id = stream_id
        self.num_streams = num_streams
        self.max_doc_chars = max_doc_chars  # the record is already in memory: only its text is checked
        self._ds = None
        self._it = None
        self._resume: dict | None = None  # state to start from; None: the beginning
        self._pulled = False

    def start_epoch(self, rng: np.random.Generator | None) -> None:
        # The dataset keeps its own shard order; a fresh split restarts it from the beginning.
        self._ds, self._it, self._resume, self._pulled = None, None, None, False

    def next_record(self) -> Record | None:
        if self._it is None:
            self._ds = self._split()
            if self._resume is not None:
                self._ds.load_state_dict(self._resume)
            self._it = iter(self._ds)
        try:
            record = next(self._it)
        except StopIteration:
            return None
        self._pulled = True
        return record_text(record, self.max_doc_chars)

    def _split(self):
        # Always a fresh copy, even for one stream: load_state_dict() sticks to the object it is
        # called on, and the next epoch must start from the beginning.
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(self._base, rank=self.stream_id, world_size=self.num_streams)

    def close(self) -> None:
        self._it = None

    def state(self) -> dict:
        if self._ds is None or not self._pulled:
            return {"dataset": self._resume}
        return {"dataset": self._ds.state_dict()}

    def load_state(self, state: dict) -> None:
        self._ds, self._it, self._pulled = None, None, False
        self._resume = state["dataset"]


# --------------------------------------------------------------------------- documents


def _generator(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class DocumentStream:
    """Valid documents of one shard (malformed ones counted), through a seeded shuffle buffer, endlessly."""

    def __init__(self, shard: LocalShard | HubShard, *, stream_id: int, seed: int, buffer_size: int):
        self.shard = shard
        self.stream_id = stream_id
        self.seed = seed
        self.buffer_size = buffer_size
        self.counters = {"docs_read": 0, **{f"skipped_{r}": 0 for r in SKIP_REASONS}}
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # completed passes over the shard
        self._epoch_docs = 0
        self._exhausted = False
        self._buffer: list[str] = []
        self._rng = _generator(self.seed, self.stream_id, epoch, 0)
        self.shard.start_epoch(_generator(self.seed, self.stream_id, epoch, 1) if self.buffer_size else None)

    def _read(self) -> str | None:
        while (item := self.shard.next_record()) is not None:
            text, reason = item
            if reason is None:
                self.counters["docs_read"] += 1
                self._epoch_docs += 1
                return text
            self.counters[f"skipped_{reason}"] += 1
        return None

    def next_document(self) -> str:
        while True:
            while not self._exhausted and len(self._buffer) < max(self.buffer_size, 1):
                text = self._read()
                if text is None:
                    self._exhausted = True
                else:
                    self._buffer.append(text)
            if self._buffer:
                if self.buffer_size > 1:  # pop a uniformly drawn document (swap it to the end first)
                    i = int(self._rng.integers(len(self._buffer)))
                    self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
                return self._buffer.pop()
            if self._epoch_docs == 0:
                raise ValueError(
                    f"data stream {self.stream_id} has no usable document (all skipped: {self.counters}); "
                    "too little data for this many streams?"
                )
            self._start_epoch(self.epoch + 1)

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "epoch_docs": self._epoch_docs,
            "exhausted": self._exhausted,
            "shard": self.shard.state(),
            "buffer": list(self._buffer),
            "rng": self._rng.bit_generator.state,
            "counters": dict(self.counters),
        }

    def load_state(self, state: dict) -> None:
        self._start_epoch(int(state["epoch"]))  # the epoch's file order, then the position in it
        self.shard.load_state(state["shard"])
        self._epoch_docs = int(state["epoch_docs"])
        self._exhausted = bool(state["exhausted"])
        self._buffer = list(state["buffer"])
        self._rng.bit_generator.state = state["rng"]
        self.counters.update({k: int(v) for k, v in state["counters"].items()})


# --------------------------------------------------------------------------- tokens


def encode_with_eos(tokenizer, texts: list[str]) -> np.ndarray:
    """The ids of the documents, one EOS after each, as one flat int32 array."""
    flat: list[int] = []
    eos = tokenizer.eos_id
    for ids in tokenizer.encode_batch(texts):
        flat.extend(ids)
        flat.append(eos)
    return np.asarray(flat, dtype=np.int32)


def pack_windows(tokens: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """Windows k = tokens[k*seq_len : k*seq_len + seq_len + 1] for k < n (needs n*seq_len + 1 tokens)."""
    need = n * seq_len + 1
    if len(tokens) < need:
        raise ValueError(f"{n} windows of seq_len {seq_len} need {need} tokens, got {len(tokens)}")
    return np.lib.stride_tricks.sliding_window_view(tokens[:need], seq_len + 1)[::seq_len].copy()


def _encode_state(tokens: np.ndarray) -> str:
    return base64.b64encode(tokens.astype("<i4").tobytes()).decode("ascii")


def _decode_state(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i4").astype(np.int32)


class TokenPacker:
    """Documents -> ids + EOS -> windows of seq_len + 1 tokens with stride seq_len."""

    def __init__(self, docs: DocumentStream, tokenizer, *, seq_len: int, encode_batch: int):
        self.docs = docs
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.encode_batch = encode_batch
        # Not yet emitted as an input (starts with the carry-over), saved in every checkpoint. Encoding
        # stops once n*seq_len + 1 tokens are there, so what is left after a call is at most the last
        # encode call's tokens: encode_batch documents of at most data.max_doc_chars characters.
        self._tokens = np.empty(0, dtype=np.int32)
        self.counters = {"tokens": 0, "batches": 0}

    def next_windows(self, n: int) -> np.ndarray:
        need = n * self.seq_len + 1
        if len(self._tokens) < need:
            parts, have = [self._tokens], len(self._tokens)
            while have < need:
                texts = [self.docs.next_document() for _ in range(self.encode_batch)]
                parts.append(encode_with_eos(self.tokenizer, texts))
                have += len(parts[-1])
            self._tokens = np.concatenate(parts)
        out = pack_windows(self._tokens, n, self.seq_len)
        self._tokens = self._tokens[n * self.seq_len :].copy()
        self.counters["tokens"] += n * self.seq_len
        self.counters["batches"] += 1
        return out

    def state(self) -> dict:
        return {"tokens": _encode_state(self._tokens), "counters": dict(self.counters), "docs": self.docs.state()}

    def load_state(self, state: dict) -> None:
        self._tokens = _decode_state(state["tokens"])
        self.counters.update({k: int(v) for k, v in state["counters"].items()})
        self.docs.load_state(state["docs"])


# --------------------------------------------------------------------------- sources


def _local_files(cfg: DataConfig, pattern: str, key: str) -> list[Path]:
    root = Path(cfg.local_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"data.local_dir={cfg.local_dir!r} is not a directory")
    try:
        files = [p for p in root.glob(pattern) if p.is_file()]
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"data.{key}={pattern!r} is not a usable glob: {e}") from None
    if not files:
        raise ValueError(f"data.{key}={pattern!r} matches no file in data.local_dir={cfg.local_dir!r}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _files_fingerprint(files: list[Path]) -> str:
    # Names, not paths: the data may move to another folder between runs.
    names = "\n".join(p.name for p in files)
    return f"{len(files)} files, sha1 {hashlib.sha1(names.encode()).hexdigest()[:16]}"


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _load_hub_split(cfg: DataConfig, split: str):
    import datasets

    kwargs = {"data_files": dict(cfg.data_files)} if cfg.data_files else {}
    try:
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, split=split, streaming=True, **kwargs)
    except Exception as e:  # network, missing split, unknown dataset: one line at start-up
        raise ValueError(
            f"cannot stream split {split!r} of data.dataset={cfg.dataset!r} ({cfg.dataset_config!r}): "
            f"{_one_line(e)}; offline, set data.local_dir to a folder of json.gz shards"
        ) from None


def _check_max_doc_chars(cfg: DataConfig) -> None:
    if cfg.max_doc_chars < 1:
        raise ValueError(f"data.max_doc_chars={cfg.max_doc_chars} must be positive")


def check_data_source(cfg: DataConfig) -> None:
    """Raise a one-line ValueError if the configured local files do not exist (call before compute)."""
    if cfg.local_dir:
        _local_files(cfg, cfg.train_glob, "train_glob")
        _local_files(cfg, cfg.validation_glob, "validation_glob")
    elif cfg.data_files:
        for split, pattern in cfg.data_files.items():
            if "://" not in pattern and not glob(str(Path(pattern).expanduser()), recursive=True):
                raise ValueError(f"data.data_files.{split}={pattern!r} matches no file")


def train_source(cfg: DataConfig) -> str:
    """The training data as a checkpoint's data state names it ("source" in build_train_loader's
    header): in local mode the file names, not their folder, so the data may move between runs."""
    if cfg.local_dir:
        return f"local: {_files_fingerprint(_local_files(cfg, cfg.train_glob, 'train_glob'))}"
    return f"hub: {cfg.dataset} {cfg.dataset_config}"


HUB_PROBE_RECORDS = 10_000  # a Hub stream may be endless: how far the probe looks for a usable document


def _first_document(shard: LocalShard | HubShard, limit: int | None = None) -> tuple[bool, dict[str, int]]:
    """Read `shard` up to its first usable document: (found, skipped records by reason)."""
    skipped: dict[str, int] = {}
    for _ in itertools.count() if limit is None else range(limit):
        item = shard.next_record()
        if item is None:
            break
        if item[1] is None:
            shard.close()
            return True, skipped
        skipped[item[1]] = skipped.get(item[1], 0) + 1
    shard.close()
    return False, skipped


def check_train_documents(cfg: DataConfig, num_streams: int) -> None:
    """Raise a one-line ValueError unless the training data has a usable document (and, in local
    mode, each of the `num_streams` streams has one): what DocumentStream would find at the first
    step, found before the run starts. Cheap on good data: it reads up to the first usable record."""
    if not cfg.local_dir:
        found, skipped = _first_document(HubShard(_load_hub_split(cfg, "train"), 0, 1, cfg.max_doc_chars),
                                         HUB_PROBE_RECORDS)
        if not found:
            raise ValueError(f"data.dataset={cfg.dataset!r}: no usable document in the first records of its train "
                             f"split (skipped: {skipped or 'none, the split is empty'})")
        return
    files = _local_files(cfg, cfg.train_glob, "train_glob")
    found, skipped = _first_document(LocalShard(files, 0, 1, cfg.max_doc_chars))
    if not found:
        raise ValueError(f"data.train_glob={cfg.train_glob!r} in data.local_dir={cfg.local_dir!r}: no usable "
                         f"document in its {len(files)} file(s) (skipped: {skipped or 'none, the files are empty'})")
    for s in range(num_streams) if num_streams > 1 else ():
        if not _first_document(LocalShard(files, s, num_streams, cfg.max_doc_chars))[0]:
            raise ValueError(f"training data stream {s} of {num_streams} (global_batch_size / micro_batch_size) has "
                             f"no usable document: too little usable data in the {len(files)} files of "
                             f"data.local_dir={cfg.local_dir!r} for that many streams")


# --------------------------------------------------------------------------- loaders


def sum_stats(streams: Iterable[tuple[dict[str, int], dict[str, int], int]]) -> dict[str, int]:
    """The counters of streams given as (document counters, packer counters, epoch): sums, except
    `epochs`, the most passes completed over any shard."""
    out: dict[str, int] = {}
    epochs = 0
    for docs, packed, epoch in streams:
        for k, v in itertools.chain(docs.items(), packed.items()):
            out[k] = out.get(k, 0) + v
        epochs = max(epochs, epoch)
    out["docs_skipped"] = sum(out.get(f"skipped_{r}", 0) for r in SKIP_REASONS)
    out["epochs"] = epochs
    return out


class TrainLoader:
    """The training streams this process reads; see the module docstring."""

    def __init__(self, packers: dict[int, TokenPacker], *, micro_batch_size: int, header: dict):
        self._packers = packers
        self.micro_batch_size = micro_batch_size
        self._header = header  # what must match for a saved state to resume exactly

    @property
    def stream_ids(self) -> list[int]:
        return sorted(self._packers)

    def _packer(self, stream_id: int) -> TokenPacker:
        if stream_id not in self._packers:
            raise ValueError(f"stream {stream_id} is not one of this loader's streams {self.stream_ids}")
        return self._packers[stream_id]

    def next_batch(self, stream_id: int) -> torch.Tensor:
        """(micro_batch_size, seq_len + 1) int64 token ids; inputs [:, :-1], targets [:, 1:]."""
        windows = self._packer(stream_id).next_windows(self.micro_batch_size)
        return torch.from_numpy(windows.astype(np.int64))

    def stream_state(self, stream_id: int) -> dict:
        """The resumable state of one stream, with the header a resume checks."""
        return {**self._header, "stream_id": stream_id, **self._packer(stream_id).state()}

    def state_dict(self) -> dict[str, dict]:
        return {str(s): self.stream_state(s) for s in self._packers}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore this loader's streams; entries for other streams (other ranks') are ignored."""
        for s, packer in self._packers.items():
            if str(s) not in state:
                raise ValueError(f"data state has no entry for stream {s} (has {sorted(state, key=str)})")
            entry = state[str(s)]
            for key, want in self._header.items():
                if entry.get(key) != want:
                    raise ValueError(f"data state of stream {s} has {key}={entry.get(key)!r}, this run {want!r}")
            packer.load_state(entry)

    def stats(self) -> dict[str, int]:
        return sum_stats((p.docs.counters, p.counters, p.docs.epoch) for p in self._packers.values())

    def close(self) -> None:
        for p in self._packers.values():
            p.docs.shard.close()


class _ReaderThread:
    """The background thread of a PrefetchLoader. It keeps up to `depth` batches ready per stream,
    each with its stream's state after it, reading the streams in turn (the order the trainer takes
    them in). A stream whose reading fails keeps its error, raised when that stream is next asked."""

    def __init__(self, loader: TrainLoader, depth: int, pin_memory_device: torch.device | None):
        self._loader = loader
        self._depth = depth
        self._pin_device = pin_memory_device
        self._order = loader.stream_ids
        self._ready: dict[int, collections.deque] = {s: collections.deque() for s in self._order}
        self._failed: dict[int, BaseException] = {}
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="megamora-data-prefetch", daemon=True)
        self._thread.start()

    def take(self, stream_id: int) -> tuple[torch.Tensor, dict]:
        """The next batch of `stream_id` and the stream's state after it; waits for it if needed."""
        with self._cond:
            while not self._ready[stream_id]:
                if stream_id in self._failed:
                    raise self._failed[stream_id]
                if self._stopping:
                    raise RuntimeError("the data reader thread was stopped")
                self._cond.wait()
            item = self._ready[stream_id].popleft()
            self._cond.notify_all()  # room for one more
        return item

    def request_stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout: float | None) -> bool:
        """Whether the thread has ended (it finishes the batch it is reading first)."""
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_stream(self, start: int) -> int | None:
        """Index in the order of the first stream from `start` on with room and no error (lock held)."""
        n = len(self._order)
        for k in range(n):
            s = self._order[(start + k) % n]
            if s not in self._failed and len(self._ready[s]) < self._depth:
                return (start + k) % n
        return None

    def _run(self) -> None:
        try:
            if self._pin_device is not None:
                torch.cuda.set_device(self._pin_device)  # pin in this rank's CUDA context, not GPU 0's
            start = 0
            while True:
                with self._cond:
                    while not self._stopping and (i := self._next_stream(start)) is None:
                        self._cond.wait()
                    if self._stopping:
                        return
                s, start = self._order[i], (i + 1) % len(self._order)
                try:
                    batch = self._loader.next_batch(s)
                    if self._pin_device is not None:
                        batch = batch.pin_memory()  # so that .to(device, non_blocking=True) is asynchronous
                    item = (batch, self._loader.stream_state(s))
                except Exception as e:  # bad data: the trainer gets it where it would have inline
                    with self._cond:
                        self._failed[s] = e
                        self._cond.notify_all()
                    continue
                with self._cond:
                    self._ready[s].append(item)
                    self._cond.notify_all()
        except BaseException as e:  # outside a stream's reading: no stream can go on
            with self._cond:
                for s in self._order:
                    self._failed.setdefault(s, e)
                self._cond.notify_all()


class PrefetchLoader:
    """A TrainLoader read ahead by a background thread; the same batches, state and stats.

    The thread starts at the first next_batch() (so a checkpoint's state loads first). state_dict()
    and stats() are those after the last batch returned by next_batch(); whenever the thread stops
    (load_state_dict, close) the reader is set back to that state, so nothing read ahead is lost."""

    STOP_TIMEOUT_S = 30.0  # close(): how long to wait for the batch being read (a stuck filesystem)

    def __init__(self, loader: TrainLoader, depth: int, pin_memory_device: torch.device | None = None):
        if depth < 1:
            raise ValueError(f"data.prefetch_batches={depth} must be positive for a PrefetchLoader")
        self._loader = loader
        self._depth = depth
        self._pin_device = pin_memory_device
        self._taken = loader.state_dict()  # per stream: the state after its last batch taken
        self._reader: _ReaderThread | None = None
        self._stop_reader_at_gc: weakref.finalize | None = None
        self._stuck = False

    @property
    def stream_ids(self) -> list[int]:
        return self._loader.stream_ids

    @property
    def micro_batch_size(self) -> int:
        return self._loader.micro_batch_size

    def next_batch(self, stream_id: int) -> torch.Tensor:
        """As TrainLoader.next_batch (pinned when built for a CUDA device)."""
        if str(stream_id) not in self._taken:
            raise ValueError(f"stream {stream_id} is not one of this loader's streams {self.stream_ids}")
        if self._reader is None:
            self._start_reader()
        batch, state = self._reader.take(stream_id)
        self._taken[str(stream_id)] = state
        return batch

    def state_dict(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self._taken.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self._stop_reader(timeout=None)  # it must not read while the streams are replaced
        self._loader.load_state_dict(state)
        self._taken = self._loader.state_dict()

    def stats(self) -> dict[str, int]:
        return sum_stats((st["docs"]["counters"], st["counters"], st["docs"]["epoch"]) for st in self._taken.values())

    def close(self) -> None:
        """Stop the thread (waiting at most STOP_TIMEOUT_S) and close the files; next_batch() reopens."""
        if self._stop_reader(timeout=self.STOP_TIMEOUT_S):
            self._loader.close()

    def _start_reader(self) -> None:
        if self._stuck:
            raise RuntimeError("the data reader thread did not stop at close(); this loader cannot read on")
        self._reader = _ReaderThread(self._loader, self._depth, self._pin_device)
        # A loader dropped without close() still ends its thread (which holds no reference to it).
        self._stop_reader_at_gc = weakref.finalize(self, self._reader.request_stop)

    def _stop_reader(self, timeout: float | None) -> bool:
        """Stop the thread and set the reader back to the state of the batches taken; False if the
        thread did not end within `timeout` (it is a daemon: it cannot keep the process alive)."""
        if self._reader is None:
            return not self._stuck
        self._stop_reader_at_gc()
        if not self._reader.join(timeout):
            self._stuck = True
            return False
        self._reader = None
        self._loader.load_state_dict(self._taken)  # drop what was read ahead
        return True


def build_train_loader(
    cfg: DataConfig,
    tokenizer,
    *,
    stream_ids: list[int],
    num_streams: int,
    micro_batch_size: int,
    seed: int,
    pin_memory_device: torch.device | None = None,
) -> TrainLoader | PrefetchLoader:
    """The loader of `stream_ids` among `num_streams` disjoint training streams (nothing is read yet):
    read ahead by a thread when prefetch_depth > 0, into pinned memory for a CUDA
    `pin_memory_device` (the device the batches go to; None or another device: not pinned)."""
    if num_streams < 1:
        raise ValueError(f"num_streams={num_streams} must be positive")
    bad = [s for s in stream_ids if not 0 <= s < num_streams]
    if bad or len(set(stream_ids)) != len(stream_ids):
        raise ValueError(f"stream_ids={list(stream_ids)} must be distinct values in [0, {num_streams})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    for key in ("seq_len", "encode_batch"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"data.{key}={getattr(cfg, key)} must be positive")
    if cfg.shuffle_buffer < 0:
        raise ValueError(f"data.shuffle_buffer={cfg.shuffle_buffer} must be >= 0")
    depth = prefetch_depth(cfg, pin_memory_device)
    if depth < 0:
        raise ValueError(f"data.prefetch_batches={depth} must be >= 0")
    _check_max_doc_chars(cfg)

    if cfg.local_dir:
        files = _local_files(cfg, cfg.train_glob, "train_glob")
        shards = {s: LocalShard(files, s, num_streams, cfg.max_doc_chars) for s in stream_ids}
        source = f"local: {_files_fingerprint(files)}"
    else:
        base = _load_hub_split(cfg, "train")
        shards = {s: HubShard(base, s, num_streams, cfg.max_doc_chars) for s in stream_ids}
        source = f"hub: {cfg.dataset} {cfg.dataset_config}"
    header = {
        "version": STATE_VERSION,
        "source": source,
        "num_streams": num_streams,
        "seed": seed,
        "seq_len": cfg.seq_len,
        "shuffle_buffer": cfg.shuffle_buffer,
        "max_doc_chars": cfg.max_doc_chars,  # which documents are skipped
    }
    packers = {
        s: TokenPacker(
            DocumentStream(shard, stream_id=s, seed=seed, buffer_size=cfg.shuffle_buffer),
            tokenizer,
            seq_len=cfg.seq_len,
            encode_batch=cfg.encode_batch,
        )
        for s, shard in shards.items()
    }
    loader = TrainLoader(packers, micro_batch_size=micro_batch_size, header=header)
    if not depth:
        return loader
    pin = pin_memory_device if pin_memory_device is not None and pin_memory_device.type == "cuda" else None
    return PrefetchLoader(loader, depth, pin)


def prefetch_depth(cfg: DataConfig, device: torch.device | None) -> int:
    """data.prefetch_batches; unset, 2 for batches bound for a CUDA device and 0 otherwise (see the
    field's comment in megamora.config)."""
    if cfg.prefetch_batches is not None:
        return cfg.prefetch_batches
    return 2 if device is not None and device.type == "cuda" else 0


@dataclass
class ValidationShare:
    """One rank's share of the validation set (validation_share): its sequences and their numbers."""

    sequences: torch.Tensor  # (n, seq_len + 1) int64
    index: list[int]  # ascending: each row's number in the whole set

    def first(self, n_seq: int) -> torch.Tensor:
        """This share's rows among the whole set's first n_seq sequences."""
        return self.sequences[: bisect.bisect_left(self.index, n_seq)]


def validation_share(
    cfg: DataConfig, tokenizer, num_tokens: int, *, rank: int = 0, world_size: int = 1,
    stats: dict[str, int] | None = None, at_most: bool = False,
) -> ValidationShare:
    """Rank `rank`'s share of the validation set of num_tokens target tokens, packed like training.

    The set is n_seq = max(1, num_tokens // seq_len) sequences in P = data.validation_pieces pieces:
    the split's record j (in file order, malformed ones counted) goes to piece j % P, and piece k
    packs its documents' tokens into the set's sequences k, k + P, k + 2P, ... (P = 1: the first
    tokens of the split, in order). The set does not depend on the world size; rank r tokenizes only
    pieces r, r + world_size, ... (every rank reads the records, which is cheap; tokenizing is not).

    Raises a ValueError if a piece is too short for its sequences, rather than silently evaluating
    on fewer tokens, unless `at_most`: then every piece keeps the whole sequences it holds, and the
    caller checks the total over the ranks (check_validation_size). Documents read and skipped (by
    reason) in this rank's pieces are added to `stats` when given.
    """
    if num_tokens < 1:
        raise ValueError(f"validation num_tokens={num_tokens} must be positive")
    if cfg.seq_len < 1 or cfg.encode_batch < 1 or cfg.validation_pieces < 1:
        raise ValueError(f"data.seq_len={cfg.seq_len}, data.encode_batch={cfg.encode_batch} and "
                         f"data.validation_pieces={cfg.validation_pieces} must be positive")
    _check_max_doc_chars(cfg)
    if cfg.local_dir:
        shard = LocalShard(_local_files(cfg, cfg.validation_glob, "validation_glob"), 0, 1, cfg.max_doc_chars)
    else:
        shard = HubShard(_load_hub_split(cfg, "validation"), 0, 1, cfg.max_doc_chars)
    seq_len, pieces = cfg.seq_len, cfg.validation_pieces
    n_seq = max(1, num_tokens // seq_len)
    quota = {k: n_seq // pieces + (k < n_seq % pieces) for k in range(rank, min(pieces, n_seq), world_size)}
    texts: dict[int, list[str]] = {k: [] for k in quota}
    parts: dict[int, list[np.ndarray]] = {k: [] for k in quota}
    have = dict.fromkeys(quota, 0)
    filling = set(quota)
    counts = stats if stats is not None else {}

    def encode(k: int) -> None:
        if texts[k]:
            parts[k].append(encode_with_eos(tokenizer, texts[k]))
            have[k] += len(parts[k][-1])
            texts[k] = []
        if have[k] >= quota[k] * seq_len + 1:
            filling.discard(k)

    for j in itertools.count():
        item = shard.next_record() if filling else None
        if item is None:
            break
        k = j % pieces
        if k not in filling:
            continue
        text, reason = item
        key = "docs_read" if reason is None else f"skipped_{reason}"
        counts[key] = counts.get(key, 0) + 1
        if text is not None:
            texts[k].append(text)
            if len(texts[k]) == cfg.encode_batch:
                encode(k)
    shard.close()
    for k in list(filling):  # the split ended: the last documents of the piece
        encode(k)
    rows, index = [], []
    for k, q in quota.items():
        held = min(q, max(0, (have[k] - 1) // seq_len))
        if held < q and not at_most:
            where, which = ("", str(n_seq)) if pieces == 1 else (
                f" in piece {k} of data.validation_pieces={pieces}", f"its {q} of the {n_seq}")
            raise ValueError(
                f"the validation split holds {have[k]} tokens{where}, fewer than the {q * seq_len + 1} that {which} "
                f"sequences of data.seq_len={seq_len} need (eval tokens {num_tokens}); lower the eval tokens")
        if held:
            rows.append(pack_windows(np.concatenate(parts[k]), held, seq_len))
            index += [k + i * pieces for i in range(held)]
    order = np.argsort(index, kind="stable")  # the set's order: the pieces interleaved
    sequences = np.concatenate(rows)[order] if rows else np.empty((0, seq_len + 1), dtype=np.int32)
    return ValidationShare(torch.from_numpy(sequences.astype(np.int64)), sorted(index))


def check_validation_size(total_sequences: int, cfg: DataConfig) -> None:
    """An evaluation needs one sequence at least (the total over the ranks' shares)."""
    if total_sequences < 1:
        raise ValueError(f"the validation split holds fewer tokens than one sequence of data.seq_len={cfg.seq_len} "
                         f"needs ({cfg.seq_len + 1})")


def validation_batches(
    cfg: DataConfig, tokenizer, num_tokens: int, *, stats: dict[str, int] | None = None, at_most: bool = False
) -> torch.Tensor:
    """The whole validation set of num_tokens target tokens (validation_share of one process):
    (n_seq, seq_len + 1) int64, with n_seq = max(1, num_tokens // seq_len), or with `at_most` the
    sequences the split holds if fewer (less than one is still an error)."""
    share = validation_share(cfg, tokenizer, num_tokens, stats=stats, at_most=at_most)
    check_validation_size(len(share.index), cfg)
    return share.sequences
