"""Start-up cost of the validation set per rank: the seconds rank r spends in validation_share (read
the split's records, tokenize its own pieces, pack) for several world sizes, the slowest rank shown.

    python benchmarks/bench_validation.py                          # the local C4 sample, t5-base
    python benchmarks/bench_validation.py --tokens 100000 --world-sizes 1 2 4

Before data.validation_pieces every rank tokenized the whole set: the world size 1 row, on every
rank. Each rank still reads every record up to where its pieces are full (gzip + JSON), which is
what stays of the W = 1 time as W grows.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from megamora.config import DataConfig
from megamora.data import validation_share
from megamora.tokenizer import load_tokenizer

SHARED = Path(os.environ.get("MEGAMORA_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-dir", default=str(SHARED / "c4-sample" / "en"))
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "t5-base" / "spiece.model"))
    p.add_argument("--tokens", type=int, default=200_000, help="validation tokens (the sample holds ~0.5 M)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--pieces", type=int, default=DataConfig.validation_pieces)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeat", type=int, default=3)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cfg = DataConfig(local_dir=args.local_dir, tokenizer=args.tokenizer, seq_len=args.seq_len,
                     validation_pieces=args.pieces)
    tokenizer = load_tokenizer(cfg.tokenizer)
    validation_share(cfg, tokenizer, args.tokens)  # warm the page cache and the tokenizer
    base = None
    print(f"{args.tokens} validation tokens, seq_len {args.seq_len}, {args.pieces} pieces")
    print(f"{'world':>5} {'slowest rank s':>14} {'vs world 1':>10} {'sequences':>9}")
    for world in args.world_sizes:
        seconds, rows = [], 0
        for rank in range(world):
            times = []
            for _ in range(args.repeat):  # the fastest of a few: the machine may be busy
                start = time.perf_counter()
                share = validation_share(cfg, tokenizer, args.tokens, rank=rank, world_size=world)
                times.append(time.perf_counter() - start)
            seconds.append(min(times))
            rows += share.sequences.shape[0]
        base = base or max(seconds)
        print(f"{world:>5} {max(seconds):>14.3f} {max(seconds) / base:>10.2f} {rows:>9}")


if __name__ == "__main__":
    main()
