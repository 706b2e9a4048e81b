"""Devices and CPUs as a cluster lays them out (issue 16, items 6 and 11), with CUDA mocked: which GPU
a local rank takes, the fp32 matmul precision in force on CUDA and CPU, and each rank's share of
the CPUs for the tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megamora import distributed
from megamora.config import ConfigError, ParallelConfig, load_config
from megamora.distributed import cpus_per_rank, init_distributed, pick_device
from megamora.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

from conftest import SHARED_DATA

T5 = SHARED_DATA / "tokenizers" / "t5-base"


@pytest.fixture(autouse=True)
def own_rayon_setting(monkeypatch):
    """load_tokenizer sets RAYON_NUM_THREADS in this process: restored after each test."""
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a node that shows this process `n` GPUs; records set_float32_matmul_precision."""
    calls: list[str] = []

    def gpus(n: int) -> list[str]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
        return calls

    return gpus


@pytest.mark.parametrize("visible, local_rank, index", [
    (8, 3, 3),  # torchrun: every rank of the node sees its 8 GPUs
    (1, 3, 0),  # srun --gpus-per-task=1: each task sees only its own GPU, as cuda:0
    (4, 5, 1),  # two tasks of 4 GPUs each
])
def test_local_rank_picks_a_gpu_this_process_sees(fake_cuda, visible, local_rank, index):
    fake_cuda(visible)
    assert pick_device("auto", local_rank) == torch.device("cuda", index)
    assert pick_device("cuda", local_rank) == torch.device("cuda", index)


def test_cpu_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 3) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="parallel.device=cuda"):
        pick_device("cuda", 0)


def _unlaunched(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("precision", ["high", "highest", "medium"])
def test_fp32_matmul_precision_is_set_on_cuda(fake_cuda, monkeypatch, precision):
    calls = fake_cuda(1)
    _unlaunched(monkeypatch)
    info = init_distributed(ParallelConfig(fp32_matmul_precision=precision))
    assert info.device == torch.device("cuda", 0)
    assert calls == [precision]
    assert info.fp32_matmul_precision == precision


def test_fp32_matmul_precision_default_is_tf32_on_cuda(fake_cuda, monkeypatch):
    calls = fake_cuda(1)
    _unlaunched(monkeypatch)
    assert init_distributed(ParallelConfig()).fp32_matmul_precision == "high"
    assert calls == ["high"]


def test_cpu_runs_keep_true_fp32_matmuls(monkeypatch):
    """On CPU torch's global setting would reach oneDNN ("medium" runs fp32 GEMMs in bf16 on CPUs
    with AVX512-BF16), so nothing is set there, whatever the config asks for."""
    calls: list[str] = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    _unlaunched(monkeypatch)
    for precision in ("high", "medium"):
        info = init_distributed(ParallelConfig(device="cpu", fp32_matmul_precision=precision))
        assert info.device.type == "cpu" and info.fp32_matmul_precision == "highest"
    assert calls == []
    assert torch.get_float32_matmul_precision() == "highest"


def test_bad_fp32_matmul_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="parallel.fp32_matmul_precision='tf32' is not one of"):
        load_config(overrides=["run_dir=x", "parallel.fp32_matmul_precision=tf32"])


# ---------------------------------------------------------------------------------------------
# CPUs per rank


@pytest.mark.parametrize("affinity, local_world, share", [(64, "8", 8), (16, None, 16), (2, "4", 1), (30, "4", 7)])
def test_cpus_per_rank_splits_the_affinity_set(monkeypatch, affinity, local_world, share):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert cpus_per_rank() == share


def test_sentencepiece_encodes_on_this_ranks_share(monkeypatch):
    monkeypatch.setattr(distributed, "cpus_per_rank", lambda: 3)
    tok = load_tokenizer(str(T5 / "spiece.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    seen = []
    real = tok._sp.encode
    monkeypatch.setattr(tok._sp, "encode", lambda texts, **kw: seen.append(kw["num_threads"]) or real(texts, **kw))
    assert tok.encode_batch(["hello world", "a second text"])
    assert seen == [3]
    assert load_tokenizer(str(T5 / "spiece.model"), num_threads=2)._num_threads == 2


def test_hf_tokenizer_pool_gets_this_ranks_share():
    """Rayon sizes its pool once per process from RAYON_NUM_THREADS: checked in a fresh process
    (2 ranks on one node, 4 CPUs): the worker threads it starts are this rank's 2, not all 4."""
    code = (
        "import os; os.sched_getaffinity = lambda pid: set(range(4))\n"
        "from megamora.tokenizer import load_tokenizer\n"
        f"tok = load_tokenizer({str(T5 / 'tokenizer.json')!r})\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "tok.encode_batch(['hello world ' * 50] * 64)\n"
        "print(os.environ['RAYON_NUM_THREADS'], len(os.listdir('/proc/self/task')) - before)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_THREADS")}
    env["LOCAL_WORLD_SIZE"] = "2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "2"]


def test_a_users_rayon_setting_is_kept(monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "5")
    assert isinstance(load_tokenizer(str(T5 / "tokenizer.json"), num_threads=2), HFTokenizer)
    assert os.environ["RAYON_NUM_THREADS"] == "5"


def test_bad_thread_count():
    with pytest.raises(ValueError, match="num_threads=0 must be positive"):
        load_tokenizer(str(T5 / "spiece.model"), num_threads=0)


# ---------------------------------------------------------------------------------------------
# Merges stay exact under TF32


@pytest.fixture
def tf32_matmuls():
    """The global setting a CUDA run gets from parallel.fp32_matmul_precision=high (the default)."""
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision("highest")


def test_adapter_dw_is_computed_in_true_fp32(monkeypatch, tf32_matmuls):
    """A merge (ReLoRA / ReMoRA restart, merge_checkpoint) must fold the exact dW: inside
    delta_weight fp32 matmuls run at "highest", and the run's setting comes back afterwards."""
    from megamora.adapters import lora as lora_module
    from megamora.adapters import LoRALinear, MoRALinear

    seen = []
    real_full, real_eye = lora_module.full_tensor, torch.eye
    monkeypatch.setattr(lora_module, "full_tensor",
                        lambda t: seen.append(torch.get_float32_matmul_precision()) or real_full(t))
    monkeypatch.setattr(torch, "eye", lambda *a, **kw: seen.append(torch.get_float32_matmul_precision()) or real_eye(*a, **kw))
    LoRALinear(torch.nn.Linear(16, 8, bias=False), r=2, alpha=4).delta_weight()
    MoRALinear(torch.nn.Linear(16, 8, bias=False), r=2).delta_weight()
    assert seen and set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "high"


def test_deepspeed_is_told_the_gpu_the_run_picked(monkeypatch, fake_cuda):
    """srun --gpus-per-task=1: LOCAL_RANK is 3 but the task's only GPU is cuda:0; DeepSpeed, left to
    itself, would call set_device(LOCAL_RANK)."""
    from types import SimpleNamespace

    from megamora.config import TrainConfig
    from megamora.distributed import DistInfo
    from megamora.engines import deepspeed as ds_engine

    fake_cuda(1)
    seen = {}

    def initialize(args=None, model=None, optimizer=None, config=None, dist_init_required=None):
        seen["args"] = args
        return SimpleNamespace(module=model), optimizer, None, None

    monkeypatch.setattr(ds_engine, "require_deepspeed", lambda: SimpleNamespace(initialize=initialize))
    cfg = TrainConfig(run_dir="x", parallel=ParallelConfig(engine="deepspeed"))
    engine = ds_engine.DeepSpeedEngine(cfg, DistInfo(3, 4, 3, pick_device("auto", 3)))
    engine.setup(torch.nn.Linear(2, 2), None)
    assert seen["args"].device_rank == 0
    assert ds_engine.device_args(torch.device("cpu")) is None  # CPU runs: DeepSpeed's own choice, as before
