"""Data-pipeline throughput: read + shuffle + tokenize + pack, one stream, in tokens per second.

    python benchmarks/bench_data.py                        # the local C4 sample, t5-base spiece.model
    python benchmarks/bench_data.py --consumption 25000    # and the ratio to a training rate (tokens/s)

The goal is a ratio of at least 10: the data pipeline then costs the trainer at most ~10% of a step
even though it runs in the training process, between steps.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

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
    return p.parse_args()


def main() -> None:
    args = parse_args()
    tok = load_tokenizer(args.tokenizer, num_threads=args.threads)
    cfg = DataConfig(
        local_dir=args.local_dir,
        seq_len=args.seq_len,
        shuffle_buffer=args.shuffle_buffer,
        encode_batch=args.encode_batch,
    )
    loader = build_train_loader(cfg, tok, stream_ids=[0], num_streams=1, micro_batch_size=args.micro_batch, seed=0)
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
    if args.consumption:
        ratio = rate / args.consumption
        print(f"training consumes {args.consumption:,.0f} tokens/s: pipeline / consumption = {ratio:.1f}x")


if __name__ == "__main__":
    main()
