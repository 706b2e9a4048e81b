#!/usr/bin/env python
"""Table 3 (C4 perplexity beside the paper's), Figures 4 and 5 and the verdict for several runs.

    python tools/report.py --runs lora=runs/a mora=runs/b relora=runs/c remora=runs/d --out report/

The report tools/reproduce.py writes over seeds (megamora.report), each run a row of its own (n = 1):
report.md, results.json, figure4.png and figure5.png in --out. Perplexity is each run's final eval
record (metrics.jsonl); --eval recomputes it from the newest checkpoint, as tools/eval_ppl.py does.

A run's method (its label, colour and Figure 5 family) is read from its own config.yaml, never from
NAME: a NAME that names another method is kept in the row's label ("LoRA (mora)"), and a note says so
(here and in report.md). A run directory whose config.yaml is not that of the run that logged
metrics.jsonl is refused."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_run(spec: str) -> tuple[str, str]:
    """name=RUN_DIR, or RUN_DIR alone (named after its folder)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        if not path:
            raise ValueError(f"--runs {spec!r} has no run directory after '='")
        return name, path
    return Path(spec).name, spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN_DIR", help="runs to compare, in order")
    parser.add_argument("--out", default="report", help="output folder (default: report)")
    parser.add_argument("--eval", action="store_true", help="recompute perplexity instead of reading metrics.jsonl")
    parser.add_argument("--eval-tokens", type=int,
                        help="with --eval: validation tokens (default: as each run's final eval)")
    parser.add_argument("--data", action="append", default=[], metavar="data.key=value",
                        help="with --eval: override of the runs' data config (repeatable)")
    parser.add_argument("--threshold", type=float, default=0.1, help="Figure 5 singular value threshold (default 0.1)")
    parser.add_argument("--no-figure", action="store_true",
                        help="skip Figure 5 and the singular values (no checkpoints needed)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    args = parser.parse_args(argv)
    try:
        from megamora.evaluate import eval_device
        from megamora.report import report_runs

        paths, notes = report_runs([parse_run(s) for s in args.runs], args.out, recompute_eval=args.eval,
                                   with_spectrum=not args.no_figure, threshold=args.threshold,
                                   data_overrides=args.data, eval_tokens=args.eval_tokens,
                                   device=eval_device(args.device))
    except (ValueError, OSError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    print(paths["report"].read_text().split("## Figure 4")[0].strip())
    for note in notes:
        print(f"note: {note}")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
