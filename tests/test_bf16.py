"""bf16 training through the real entry point, as the table3 configs run it: `parallel.param_dtype=
bfloat16` (FSDP2: the mixed-precision policy; one process and DeepSpeed: autocast) and
`parallel.reduce_dtype=bfloat16` (gradients reduced in bf16), on one process and on two ranks with
either engine. The losses follow the fp32 run and each other within bf16 rounding, step by step.

A few tiny steps (avx512_bf16 CPUs run bf16 GEMMs natively, others emulate them slowly); the four
runs start together."""

import pytest

from megamora.metrics import read_metrics
from test_train import launch_together, losses, tiny_overrides

STEPS = 4
BF16 = ["parallel.param_dtype=bfloat16", "parallel.reduce_dtype=bfloat16"]
RUNS = {  # name: (ranks, overrides)
    "fp32": (1, []),
    "bf16": (1, BF16),
    "fsdp2-bf16": (2, BF16),
    "deepspeed-bf16": (2, [*BF16, "parallel.engine=deepspeed"]),
}
# Measured over these 4 steps (2-core EPYC, avx512_bf16; loss about 10.1-10.4): bf16 vs fp32 at most
# 1.3e-4 of the loss (DeepSpeed), the bf16 runs among themselves at most 5.3e-5 (FSDP2 2 ranks vs one
# process). The bounds are about 4x those, and far below bf16's own relative precision (2^-8 = 3.9e-3).
VS_FP32 = 5e-4
AMONG_BF16 = 2e-4
# fp32 runs agree to 1e-5 across ranks and engines (test_train.py, test_deepspeed.py); every bf16 run
# here is further from fp32 than that (measured at least 4.9e-5): it did compute in bf16.
FP32_NOISE = 1e-5


def max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[step] - b[step]) / abs(b[step]) for step in b)


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    launch_together(*[(tiny_overrides(shared_data, root / name, f"steps={STEPS}", "eval_every=0", "save_every=0",
                                      *extra), nproc) for name, (nproc, extra) in RUNS.items()])
    return {name: root / name for name in RUNS}


def test_bf16_runs_follow_fp32_and_each_other(runs):
    loss = {name: losses(run_dir) for name, run_dir in runs.items()}
    assert all(sorted(steps) == list(range(1, STEPS + 1)) for steps in loss.values()), loss
    final = {name: read_metrics(run_dir, "eval")[-1]["loss"] for name, run_dir in runs.items()}
    for name in ("bf16", "fsdp2-bf16", "deepspeed-bf16"):
        setup = read_metrics(runs[name], "setup")[0]
        assert setup["world_size"] == RUNS[name][0], name
        assert FP32_NOISE < max_rel(loss[name], loss["fp32"]) < VS_FP32, (name, loss[name], loss["fp32"])
        assert max_rel(loss[name], loss["bf16"]) < AMONG_BF16, (name, loss[name], loss["bf16"])
        assert final[name] == pytest.approx(final["fp32"], rel=VS_FP32), name  # the final evaluation too
