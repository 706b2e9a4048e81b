"""Pretraining entry point.

    python launch/pretrain.py --config configs/smoke/full.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 launch/pretrain.py \
        --config configs/table3/250m/base.yaml configs/table3/250m/mora.yaml run_dir=runs/x
    deepspeed --num_gpus 8 launch/pretrain.py --config ... parallel.engine=deepspeed parallel.zero_stage=2
    ... --dry-run   # print the plan (batch, parameters, FLOPs, memory per rank) and exit

Exit codes (every rank exits with the same one; torchrun itself reports any non-zero as 1):
    0   done: trained to `steps`
    2   bad input, or the run directory is in use by another run (nothing written)
    74  a checkpoint could not be written (disk full, I/O error); older checkpoints are intact
    75  stopped by SIGTERM / SIGINT / SIGUSR1 after saving a checkpoint: run again to resume
    130 interrupted (Ctrl-C) before training started; nothing to save
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megamora.config import ConfigError, load_config

EXIT_CONFIG = 2
EXIT_SAVE_FAILED = 74  # sysexits EX_IOERR
EXIT_STOPPED = 75  # sysexits EX_TEMPFAIL: try again (resume); not 128+N, which means killed without a checkpoint
EXIT_INTERRUPTED = 130


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain a LLaMA with LoRA / MoRA / full-rank updates.")
    parser.add_argument("--config", nargs="+", action="extend", metavar="FILE",
                        help="YAML config files, merged in order (a later file wins): a base file, then deltas")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (engine, world size, batch, tokens, parameters, FLOPs, estimated "
                             "memory per rank) and exit: the model is built on the meta device only, no process "
                             "group is joined, the run directory is not created, and the data and tokenizer are "
                             "not checked (they need not exist)")
    # The deepspeed launcher passes --local_rank=N; the rank comes from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 adapter.kind=mora")
    # A key=value word is an override wherever it stands: `--config a.yaml b.yaml steps=5` would otherwise
    # hand steps=5 to --config's file list. Taken out first, the overrides keep their command-line order.
    argv = sys.argv[1:] if argv is None else list(argv)
    is_override = ["=" in a and not a.startswith("-") for a in argv]
    args = parser.parse_intermixed_args([a for a, o in zip(argv, is_override) if not o])
    args.overrides = [a for a, o in zip(argv, is_override) if o] + args.overrides  # the rest is a one-line error
    return args


def dry_run(args: argparse.Namespace, rank: int) -> int:
    """World size from the launcher's environment (WORLD_SIZE; unset: one plain process)."""
    try:
        cfg = load_config(args.config, args.overrides)
        world = os.environ.get("WORLD_SIZE")
        if world is not None and not world.strip().isdigit():
            raise ConfigError(f"WORLD_SIZE={world!r} is not a positive integer")
        from megamora.plan import format_plan, make_plan  # torch only once the config is good
        from megamora.run import check_adapters

        plan = make_plan(cfg, world_size=int(world or 1), distributed=world is not None)
        try:  # as the real run does: an adapter larger than its weight, a ReMoRA cycle changing r_hat
            check_adapters(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(format_plan(plan))
        print(f"dry run: nothing trained, run directory {cfg.run_dir} not created, data and tokenizer not checked")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    if args.dry_run:
        return dry_run(args, rank)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    def say(line: str) -> None:  # what every rank agrees on is said once
        if rank == 0:
            print(line, file=sys.stderr)

    try:
        cfg = load_config(args.config, args.overrides)
        from megamora.checkpoint import SaveFailed  # heavy imports after the config is known to be good
        from megamora.preemption import Preempted
        from megamora.run import pretrain
        from megamora.runlock import RunDirLocked

        try:
            result = pretrain(cfg, progress_bar=cfg.logging.progress_bar)
        except RunDirLocked as e:
            say(f"error: {e}")
            return EXIT_CONFIG
        except SaveFailed as e:
            say(f"error: {e}")
            return EXIT_SAVE_FAILED
        except Preempted as e:
            say(str(e))
            return EXIT_STOPPED
    except ConfigError as e:  # every rank: a problem may be one node's own (a missing local file)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # during set-up; once training runs, Ctrl-C stops it with a checkpoint
        say("interrupted before training started; nothing saved")
        return EXIT_INTERRUPTED
    finally:
        from megamora.distributed import destroy_distributed

        destroy_distributed()
    if rank == 0:
        ppl = result.final_eval.get("perplexity")
        print(f"run directory: {result.run_dir.resolve()}")
        if ppl is not None:
            short = result.final_eval.get("validation_short")  # the split is shorter than eval tokens asked
            print(f"final validation perplexity: {ppl:.2f} over {result.final_eval['tokens']} tokens"
                  + (f" (the validation split holds fewer than the {result.final_eval['tokens_requested']} asked)"
                     if short else ""))
    return 0


if __name__ == "__main__":
    from megamora.distributed import exit_process

    exit_process(main())
