#!/usr/bin/env python
"""Figure 5 numbers of one run: per module type, the mean over layers of the number of singular
values above a threshold of dW = W_final (adapters merged) - W_init, in fp32; with --since, of the
update between two checkpoints of the run (one ReLoRA / ReMoRA merge segment, say).

    python tools/count_singular_values.py RUN_DIR [--threshold 0.1] [--checkpoint DIR] [--since DIR] [--json]"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="training run directory")
    parser.add_argument("--checkpoint", help="checkpoint folder or name under RUN_DIR/checkpoints (default: newest)")
    parser.add_argument("--since", help="an earlier checkpoint (folder or name): dW from it instead of from W_init")
    parser.add_argument("--threshold", type=float, default=0.1, help="count singular values above this (default 0.1)")
    parser.add_argument("--device", default="cpu", help="where the SVDs run: cpu | cuda[:i] | auto (default cpu)")
    parser.add_argument("--json", action="store_true", help="print {module type: mean count} as JSON")
    args = parser.parse_args(argv)
    try:
        if args.threshold < 0:
            raise ValueError(f"--threshold {args.threshold} must be >= 0")
        from megamora.analysis import run_singular_value_counts
        from megamora.evaluate import eval_device
        from megamora.export import find_checkpoint

        ckpt = find_checkpoint(args.run_dir, args.checkpoint)
        since = find_checkpoint(args.run_dir, args.since) if args.since else None
        if since is not None and since.resolve() == ckpt.resolve():
            raise ValueError(f"--since {args.since} is the checkpoint itself ({ckpt}): dW would be 0")
        counts = run_singular_value_counts(args.run_dir, ckpt, args.threshold, eval_device(args.device), since)
    except (ValueError, OSError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"singular values > {args.threshold:g} of dW (mean over layers), {ckpt}"
              + (f" since {since.name}" if since is not None else ""))
        for kind, value in counts.items():
            print(f"{kind:<10} {value:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
