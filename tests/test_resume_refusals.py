"""Resumes the README refuses, through the real entry point: another tokenizer (compared by content:
the same file elsewhere resumes), another global / micro batch ratio, and for a DeepSpeed checkpoint
another ZeRO stage, another world size or the FSDP2 engine. Each is one `error:` line naming what
differs, and the run directory stays byte for byte as it was.

One 3-step run per engine, trained together once for the module; every case resumes a copy of it
(the copies run at the same time: each holds its own run-directory lock)."""

import shutil
from pathlib import Path

import pytest

from megamora.metrics import read_metrics
from test_train import launch_together, tiny_overrides

DS = ["parallel.engine=deepspeed"]  # ZeRO-2 by default


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    launch_together((tiny_overrides(shared_data, root / "fsdp2", "steps=3"), 1),
                    (tiny_overrides(shared_data, root / "deepspeed", "steps=3", *DS), 1))
    return {"fsdp2": root / "fsdp2", "deepspeed": root / "deepspeed"}


def snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def error_line(proc, nproc: int) -> str:
    """The refusal: exit code 2 (torchrun: 1), and every rank's stderr says the same one `error:` line."""
    assert proc.returncode == (2 if nproc == 1 else 1), proc.stderr[-3000:]
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1, proc.stderr[-3000:]
    if nproc == 1:
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr[-3000:]
    return errors.pop()


def test_refused_resumes_name_what_differs_and_change_nothing(runs, shared_data, tmp_path):
    tok = shared_data / "tokenizers"
    cases = {  # name: (run, overrides, ranks, what the error line must say)
        "tokenizer": ("fsdp2", [f"data.tokenizer={tok}/c4-sample-8k/spiece.model"], 1,
                      [f"data.tokenizer: {tok}/t5-base/spiece.model (run) vs {tok}/c4-sample-8k/spiece.model "
                       "(this command)", "cannot resume"]),
        "batch ratio": ("fsdp2", ["global_batch_size=8"], 1,
                        ["saved with 2 data streams; this run has 4", "global_batch_size / micro_batch_size"]),
        "zero stage": ("deepspeed", [*DS, "parallel.zero_stage=1"], 1,
                       ["DeepSpeed zero_stage=2; this run has zero_stage=1"]),
        "world size": ("deepspeed", DS, 2, ["DeepSpeed world_size=1; this run has world_size=2"]),
        "to fsdp2": ("deepspeed", [], 1, ["saved by the deepspeed engine; this run uses parallel.engine=fsdp2"]),
    }
    dirs = {name: tmp_path / name.replace(" ", "-") for name in cases}
    for name, (run, _, _, _) in cases.items():
        shutil.copytree(runs[run], dirs[name])
    before = {name: snapshot(d) for name, d in dirs.items()}
    procs = launch_together(*[(tiny_overrides(shared_data, dirs[name], "steps=6", *extra), nproc)
                              for name, (_, extra, nproc, _) in cases.items()], check=False)
    for (name, (_, _, nproc, needles)), proc in zip(cases.items(), procs):
        line = error_line(proc, nproc)
        for needle in needles:
            assert needle in line, (name, line)
        assert snapshot(dirs[name]) == before[name], name  # config.yaml, metrics, checkpoints


def test_the_same_tokenizer_elsewhere_resumes(runs, shared_data, tmp_path):
    """Compared by content, not by path: a copy of spiece.model in another folder is the same tokenizer."""
    moved = tmp_path / "moved" / "spiece.model"
    moved.parent.mkdir()
    shutil.copy(shared_data / "tokenizers" / "t5-base" / "spiece.model", moved)
    run_dir = tmp_path / "run"
    shutil.copytree(runs["fsdp2"], run_dir)
    launch_together((tiny_overrides(shared_data, run_dir, "steps=4", f"data.tokenizer={moved}"), 1))
    setup = read_metrics(run_dir, "setup")[-1]
    assert setup["resumed_from"] == str(run_dir / "checkpoints" / "step_00000003")
    assert setup["config_changes"]["data.tokenizer"] == [str(shared_data / "tokenizers/t5-base/spiece.model"),
                                                        str(moved)]
