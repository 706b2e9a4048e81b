"""Training metrics: throughput / MFU arithmetic and the sinks (JSONL file, console, wandb).

Only rank 0 writes. The JSONL file in the run directory is always written; wandb is optional and
never online unless asked for (`logging.wandb_mode`)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("megamora")

# Dense bf16 tensor-core peak FLOP/s per GPU (without 2:4 sparsity: half the datasheets' headline
# figures), matched as substrings of torch.cuda.get_device_name in this order: the first key found
# in the name wins, so specific names come before their prefixes. GPUs without bf16 tensor cores
# (V100: fp16 only) are absent: no MFU is reported there. Sources, NVIDIA datasheets:
#   H200 (nvidia.com/en-us/data-center/h200): BF16 1,979 TFLOPS SXM / 1,671 NVL, with sparsity
#   H100 (nvidia.com/en-us/data-center/h100): BF16 1,979 SXM / 1,671 NVL / 1,513 PCIe, with sparsity
#   H800 (H800 product brief): the H100's compute, 1,979 SXM / 1,513 PCIe, with sparsity
#   B200 (HGX B200 spec, nvidia.com/en-us/data-center/hgx): FP16/BF16 4.5 PFLOPS per GPU, with sparsity
#   A100 / A800 (A100, A800 datasheets): BF16 312 TFLOPS dense (624 with sparsity)
#   L40S (L40S datasheet): BF16 362.05 TFLOPS dense (733 with sparsity)
#   GB200 (GB200 NVL72 spec): FP16/BF16 5 PFLOPS per GPU, with sparsity (its B200 runs at 1,200 W)
#   A10G: AWS publishes no datasheet; the A10's BF16 125 TFLOPS dense (250 with sparsity)
PEAK_BF16_FLOPS = {
    "GB200": 2500e12,
    "B200": 2250e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800 PCIe": 756e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a known GPU, or None (CPU, unknown GPU): then only achieved FLOP/s is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # CPU: the process's peak resident set size
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:  # pragma: no cover - non-Unix
        return None


class Throughput:
    """Tokens/s, FLOP/s, MFU and mean step time of the training steps since the last `measure`.

    The clock runs over training only: `paused()` wraps what else the loop does (logging, eval,
    restarts, checkpoints). Steps run asynchronously on an accelerator, so a pause first waits for
    the queued work: the time the steps take is counted, not the time they took to launch. The loop
    pauses only where it synchronises anyway (log, eval, save steps); on CPU the wait is nothing."""

    def __init__(self, flops_per_token: float, world_size: int, device: torch.device):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.device = device
        self.peak = peak_flops(device)
        self.seconds = 0.0
        self.tokens = 0
        self.steps = 0
        self._since = time.perf_counter()

    def add(self, tokens: int) -> None:
        """One training step of `tokens` (global) done, or queued."""
        self.tokens += tokens
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._since
        try:
            yield
        finally:
            self._since = time.perf_counter()

    def measure(self) -> dict[str, float]:
        """Call inside paused()."""
        tps = self.tokens / max(self.seconds, 1e-9)  # global tokens/s
        flops = tps * self.flops_per_token / self.world_size  # achieved FLOP/s per device
        out = {"step_time_s": self.seconds / max(self.steps, 1), "tokens_per_s": tps, "flops_per_s_per_device": flops}
        if self.peak:
            out["mfu"] = flops / self.peak
        self.seconds, self.tokens, self.steps = 0.0, 0, 0
        return out


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (CPU work is done when its call returns)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, wandb_mode: str, wandb_project: str, config: dict[str, Any]):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.wandb = None
        if enabled and wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir), config=config)

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items() if k != "data")  # data stats: JSONL only
        log.info("%s step %d | %s", kind, step, shown)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
