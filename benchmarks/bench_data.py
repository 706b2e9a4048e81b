"""Data-pipeline throughput (read + shuffle + tokenize + pack, one stream, in tokens per second), and
how much of it the background reader (data.prefetch_batches) hides behind the training step.

    python benchmarks/bench_data.py                        # the local C4 sample, t5-base spiece.model
    python benchmarks/bench_data.py --consumption 25000    # and the ratio to a training rate (tokens/s)
    python benchmarks/bench_data.py --step matmul          # a step that computes on the CPU instead

The goal is a ratio of at least 10. The overlap part then consumes batches with a simulated training
step after each: `sleep` is a step on an accelerator (the host thread waits while the device works),
`matmul` one that keeps the CPU busy (the reader then competes with it for the cores). Inline
(prefetch 0) costs the data time plus the step; read ahead, about the larger of the two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from megamora.config import DataConfig
from megamora.data import build_train_loader
from megamora.tokenizer import load_tokenizer

SHARED = Path(os.environ.get("MEGAMORA_SHARED_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-dir", default=str(SHARED / "c4-sample" / "en"))
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "t5-base" / "spiece.model"))
    p.add_argument("--threads", type=int, default=-1, help="SentencePiece encode threads (-1: all cores)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--encode-batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=3_000_000, help="tokens to produce (the sample holds ~0.5M)")
    p.add_argument("--consumption", type=float, default=None, metavar="TOKENS_PER_S",
                   help="training consumption rate to compare against")
    p.add_argument("--step", choices=("sleep", "matmul", "none"), default="sleep",
                   help="the simulated training step of the overlap part (none: skip that part)")
    p.add_argument("--step-ms", type=float, default=None, help="its length (default: the data time of a batch)")
    p.add_argument("--prefetch", type=int, default=2, help="data.prefetch_batches to compare with inline")
    p.add_argument("--batches", type=int, default=200, help="batches consumed per overlap measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved measurements of each; medians are printed")
    return p.parse_args()


def make_loader(args: argparse.Namespace, tok, prefetch: int):
    cfg = DataConfig(local_dir=args.local_dir, seq_len=args.seq_len, shuffle_buffer=args.shuffle_buffer,
                     encode_batch=args.encode_batch, prefetch_batches=prefetch)
    return build_train_loader(cfg, tok, stream_ids=[0], num_streams=1, micro_batch_size=args.micro_batch, seed=0)


def throughput(args: argparse.Namespace, tok) -> float:
    """Tokens per second of the pipeline alone, read inline."""
    loader = make_loader(args, tok, prefetch=0)
    loader.next_batch(0)  # warm-up: opens the file and fills the shuffle buffer
    start_tokens = loader.stats()["tokens"]
    t0 = time.perf_counter()
    while loader.stats()["tokens"] - start_tokens < args.tokens:
        loader.next_batch(0)
    seconds = time.perf_counter() - t0
    stats = loader.stats()
    rate = (stats["tokens"] - start_tokens) / seconds
    print(f"tokenizer {args.tokenizer} (threads {args.threads}), seq_len {args.seq_len}, "
          f"micro batch {args.micro_batch}, shuffle buffer {args.shuffle_buffer}, encode batch {args.encode_batch}")
    print(f"produced {stats['tokens'] - start_tokens:,} tokens in {seconds:.2f} s over {stats['epochs']} epochs "
          f"({stats['docs_read']:,} documents, {stats['docs_skipped']} skipped)")
    print(f"data pipeline: {rate:,.0f} tokens/s (one stream)")
    return rate


def simulated_step(kind: str, seconds: float) -> Callable[[], None]:
    if kind == "sleep":
        return lambda: time.sleep(seconds)
    a = torch.randn(256, 256)
    for _ in range(50):  # warm-up: torch's thread pool
        a @ a
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:  # calibrate: matmuls per second, alone
        a @ a
        n += 1
    per_step = max(1, round(n / (time.perf_counter() - t0) * seconds))
    return lambda: [a @ a for _ in range(per_step)]


def seconds_per_batch(loader, batches: int, step: Callable[[], None]) -> float:
    loader.next_batch(0)  # warm-up, as above
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch(0)
        step()
    seconds = (time.perf_counter() - t0) / batches
    loader.close()
    return seconds


def overlap(args: argparse.Namespace, tok, rate: float) -> None:
    data_s = args.micro_batch * args.seq_len / rate
    step_s = args.step_ms / 1000 if args.step_ms is not None else data_s
    step = simulated_step(args.step, step_s)
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    step_alone = (time.perf_counter() - t0) / 20
    runs: dict[str, list[float]] = {"data": [], "inline": [], "ahead": []}
    for _ in range(args.repeats):  # interleaved: a busy machine's drift hits all three alike
        runs["data"].append(seconds_per_batch(make_loader(args, tok, 0), args.batches, lambda: None))
        runs["inline"].append(seconds_per_batch(make_loader(args, tok, 0), args.batches, step))
        runs["ahead"].append(seconds_per_batch(make_loader(args, tok, args.prefetch), args.batches, step))
    data_s, inline, ahead = (statistics.median(runs[k]) for k in ("data", "inline", "ahead"))
    print(f"overlap over {args.batches} batches (median of {args.repeats}), step {args.step} "
          f"(alone {1000 * step_alone:.2f} ms), data alone {1000 * data_s:.2f} ms a batch:")
    print(f"  inline (prefetch_batches=0):  {1000 * inline:.2f} ms a batch")
    print(f"  prefetch_batches={args.prefetch}:         {1000 * ahead:.2f} ms a batch "
          f"(speed-up {inline / ahead:.2f}x: {1000 * (inline - ahead):.2f} ms a batch saved)")


def main() -> None:
    args = parse_args()
    tok = load_tokenizer(args.tokenizer, num_threads=args.threads)
    rate = throughput(args, tok)
    if args.consumption:
        ratio = rate / args.consumption
        print(f"training consumes {args.consumption:,.0f} tokens/s: pipeline / consumption = {ratio:.1f}x")
    if args.step != "none":
        overlap(args, tok, rate)


if __name__ == "__main__":
    main()
