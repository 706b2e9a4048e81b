#!/usr/bin/env python
"""Reproduce the paper's pretraining comparison: a recipe's methods over seeds, then the report.

Table 3, Figure 4, Figure 5 and a verdict: DIR/report.md, DIR/results.json, DIR/figure4.png, DIR/figure5.png.

    python tools/reproduce.py --recipe cpu --seeds 0 1 2 --out runs/reproduce-cpu
    python tools/reproduce.py --recipe table3-250m --seeds 0 --out /shared/r250m --launcher slurm
    python tools/reproduce.py --recipe cpu --seeds 0 1 2 --out runs/reproduce-cpu --report-only

RECIPE is a name under configs/recipes/ or a path. Runs go in DIR/runs/<method>-seed<S> (warm
starts: DIR/runs/warmstart-seed<S>), each a `launch/pretrain.py` process with its log in
train.log. Running the command again skips finished runs and resumes interrupted ones; the same DIR
may take more seeds or methods of the same recipe, never another recipe or other settings.
key=value words are overrides for every run. Exit codes: 0 done (slurm: submitted), 1 a run failed,
2 bad input (nothing run; slurm: also a chain SLURM would hold for ever, e.g. more nodes than the
partition has, which is cancelled), 75 stopped by a signal (run the same command again to resume)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("local", "torchrun", "slurm")


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one `error: ...` line and exit code 2, as every other bad input here."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed {value} must be >= 0")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="recipe name (configs/recipes/NAME.yaml) or file; with --report-only: "
                                         "default DIR's")
    parser.add_argument("--seeds", nargs="+", type=seed, default=[0], metavar="S", help="seeds (default: 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: runs/, report, recipe.json")
    parser.add_argument("--methods", nargs="+", metavar="M", help="rows to run (default: the recipe's methods)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: one process per run, one after another (default); torchrun: each run "
                             "through torch.distributed.run --standalone; slurm: one sbatch job per run")
    parser.add_argument("--nproc-per-node", type=positive, default=None, metavar="N",
                        help="processes per node of each run (torchrun: default 1; slurm: default one per GPU)")
    parser.add_argument("--sbatch-args", default="", metavar="'ARGS'",
                        help="slurm: extra sbatch options for the run jobs, e.g. '--nodes 4 --partition gpu' "
                             "(one option alone: --sbatch-args=--exclusive); they win over what the runs imply: "
                             "one node, one GPU per --nproc-per-node process, none for parallel.device=cpu")
    parser.add_argument("--warm-starts", metavar="DIR",
                        help="start the methods from DIR's finished warm starts (another --out of the same recipe "
                             "and settings) instead of training this folder's own: sweeps and noise runs")
    parser.add_argument("--noise-from", nargs="+", metavar="DIR",
                        help="reproductions of the same runs with other threads, launcher or processes (made with "
                             "--warm-starts DIR): the verdict's noise floor (kept in DIR/recipe.json)")
    parser.add_argument("--report-only", action="store_true", help="write the report from DIR's finished runs")
    parser.add_argument("--dry-run", action="store_true", help="check everything, print the runs' commands, run none")
    parser.add_argument("--threshold", type=float, default=0.1, help="Figure 5 singular value threshold (0.1)")
    parser.add_argument("--device", default="cpu", help="where the report's SVDs run: cpu | cuda[:i] (default cpu)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    # A key=value word is an override wherever it stands (after --seeds 0 1 it would be taken for a seed).
    argv = sys.argv[1:] if argv is None else list(argv)
    is_override = ["=" in a and not a.startswith("-") for a in argv]
    args = parser.parse_intermixed_args([a for a, o in zip(argv, is_override) if not o])
    args.overrides = [a for a, o in zip(argv, is_override) if o] + args.overrides
    if not args.report_only and not args.recipe:
        parser.error("--recipe is required (except with --report-only)")
    if args.threshold < 0:
        parser.error(f"--threshold {args.threshold} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Absolute data paths in the runs' config.yaml: the tools then work on them from any folder.
    if "MEGAMORA_DATA" not in os.environ and (REPO.parent / "shared" / "data").is_dir():
        os.environ["MEGAMORA_DATA"] = str((REPO.parent / "shared" / "data").resolve())
    from megamora.recipes import RecipeError, load_recipe
    from megamora.reproduce import (
        EXIT_STOPPED, ReproduceError, RunFailed, check_launcher, check_noise_dirs, check_out_dir, check_plan, command,
        launch_settings, link_warm_starts, make_plan, pending_runs, read_record, submit_slurm, write_record, write_report,
    )

    out = Path(args.out)
    try:
        if args.report_only:
            record = read_record(out)
            if record is None:
                raise ReproduceError(f"{out} has no recipe.json: nothing to report on")
            if args.recipe and load_recipe(args.recipe).name != record["recipe"]:
                raise ReproduceError(f"{out} holds runs of recipe {record['recipe']!r}, not {args.recipe!r}")
            if args.noise_from:
                record["noise_from"] = [str(d) for d in check_noise_dirs(out, record, args.noise_from)]
                write_record(out, record)
            return report(out, args, write_report)
        check_launcher(args.launcher)
        recipe = load_recipe(args.recipe)
        plan = make_plan(recipe, args.seeds, args.methods, out, args.overrides)
        check_plan(plan)
        record = check_out_dir(plan)
        linked = link_warm_starts(plan, args.warm_starts, dry_run=args.dry_run) if args.warm_starts else []
        for name in linked:
            print(f"{name}: linked from {Path(args.warm_starts) / 'runs' / name}", file=sys.stderr)
        finished, todo = pending_runs(plan)
        if args.dry_run:
            for run in plan.runs:
                state = "finished" if run in finished or run.name in linked else "to run"
                print(f"{run.name} ({state}): {shlex.join(command(run, 'local'))}")
            return 0
        if args.launcher != "slurm":  # a SLURM job's processes and threads are the job's
            record["launch"] = launch_settings(args.launcher, args.nproc_per_node)
        if args.noise_from:
            record["noise_from"] = [str(d) for d in check_noise_dirs(plan.out, record, args.noise_from)]
        write_record(plan.out, record)
        for run in finished:
            print(f"skip {run.name}: finished", file=sys.stderr)
        if args.launcher == "slurm":
            report_argv = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--recipe", str(recipe.path),
                           "--out", str(plan.out), "--report-only", "--threshold", str(args.threshold),
                           "--device", args.device]
            submit_slurm(plan, todo, report_argv, shlex.split(args.sbatch_args), nproc_per_node=args.nproc_per_node)
            return 0
    except (RecipeError, ReproduceError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    try:
        from megamora.reproduce import run_local

        run_local(plan, todo, args.launcher, args.nproc_per_node or 1)
    except RunFailed as e:
        if e.code == EXIT_STOPPED:
            print(f"stopped during {e.run.name}: run the same command again to resume", file=sys.stderr)
            return EXIT_STOPPED
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped: run the same command again to resume", file=sys.stderr)
        return EXIT_STOPPED
    return report(plan.out, args, write_report)


def report(out: Path, args: argparse.Namespace, write_report) -> int:
    from megamora.reproduce import ReproduceError

    try:
        paths = write_report(out, args.threshold, args.device)
    except (ValueError, OSError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2 if isinstance(e, ReproduceError) else 1
    print(paths["report"].read_text().split("## Figure 4")[0].strip())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
