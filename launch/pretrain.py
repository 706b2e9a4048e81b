"""Pretraining entry point.

    python launch/pretrain.py --config configs/smoke/full.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 launch/pretrain.py --config configs/table3/250m/mora.yaml run_dir=runs/x
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megamora.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain a LLaMA with LoRA / MoRA / full-rank updates.")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 adapter.kind=mora")
    args = parser.parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        from megamora.run import pretrain  # heavy imports after the config is known to be good

        result = pretrain(cfg, progress_bar=cfg.logging.progress_bar)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from megamora.distributed import destroy_distributed

        destroy_distributed()
    if rank == 0:
        ppl = result.final_eval.get("perplexity")
        print(f"run directory: {result.run_dir.resolve()}")
        if ppl is not None:
            print(f"final validation perplexity: {ppl:.2f} over {result.final_eval['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
