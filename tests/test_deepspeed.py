"""DeepSpeed ZeRO 1/2/3 behind the engine seam, on 2 gloo ranks: the losses of FSDP2 step by step,
restarts that leave no stale fp32 master copy, bitwise resume, the tools on a DeepSpeed run
directory, and bad input as one line."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megamora.config import ConfigError, load_config
from megamora.engines.deepspeed import deepspeed_config
from megamora.export import load_merged_model
from megamora.hf import to_hf_names
from megamora.metrics import read_metrics
from spawn_ranks import spawn_ranks
from test_train import REPO, crash_after_first_checkpoint, launch, losses, run_in_process, tiny_overrides

DS = ["parallel.engine=deepspeed"]
KINDS = {"full": [], "lora": ["adapter.kind=lora", "adapter.r=4"], "mora": ["adapter.kind=mora", "adapter.r=4"],
         # the paper's other baselines: B's LR group (LoRA+), a frozen adapter tensor (AsyLoRA), a 1-D
         # magnitude and a weight norm in forward (DoRA, with dropout's extra GEMM)
         # LoRA+ and AsyLoRA at optim.lr 2.5e-3 (B at 1e-2, as the other rows): at B's 4e-2 the engines'
         # different summation orders grow about 3x a step (loss 3e-6 at step 6, 6e-4 at step 10), chaos, not a bug
         "lora_plus": ["adapter.kind=lora_plus", "adapter.r=4", "optim.lr=2.5e-3"],
         "asylora": ["adapter.kind=asylora", "adapter.r=4", "optim.lr=2.5e-3"],
         "dora": ["adapter.kind=dora", "adapter.r=4", "adapter.dropout=0.1"]}
STAGES = {"full": "123", "lora": "123", "mora": "123", "lora_plus": "23", "asylora": "3", "dora": "23"}
CASES = [(kind, stage) for kind, stages in STAGES.items() for stage in stages]
STEPS = 10


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    """10 steps of each adapter kind on 2 ranks: FSDP2 and ZeRO-1/2/3 (same config and data)."""
    root = tmp_path_factory.mktemp("engines")
    dirs = {}
    for kind, extra in KINDS.items():
        for engine in ("fsdp2", *STAGES[kind]):
            run_dir = root / f"{kind}-{engine}"
            ds = [] if engine == "fsdp2" else [*DS, f"parallel.zero_stage={engine}"]
            launch(tiny_overrides(shared_data, run_dir, f"steps={STEPS}", "save_every=5", *extra, *ds), nproc=2)
            dirs[kind, engine] = run_dir
    return dirs


@pytest.mark.parametrize("kind,stage", CASES)
def test_zero_losses_equal_fsdp2(runs, kind, stage):
    want, got = losses(runs[kind, "fsdp2"]), losses(runs[kind, stage])
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    norms = [{r["step"]: r["grad_norm"] for r in read_metrics(runs[kind, e], "train")} for e in ("fsdp2", stage)]
    # The global norm before clipping: within 1e-4 from the same weights at step 1; later steps amplify the
    # engines' different summation orders (a few 1e-4 on some CPUs) more than the loss does.
    assert norms[1][1] == pytest.approx(norms[0][1], rel=1e-4)
    assert norms[1] == pytest.approx(norms[0], rel=2e-3)
    setup = read_metrics(runs[kind, stage], "setup")[0]
    assert setup["engine"] == "deepspeed" and setup["zero_stage"] == int(stage) and setup["world_size"] == 2


def _tool(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("kind,stage", [("lora", "3"), ("mora", "2")])
def test_tools_read_a_deepspeed_run_as_an_fsdp2_one(runs, tmp_path, kind, stage):
    fsdp2, zero = runs[kind, "fsdp2"], runs[kind, stage]
    ppl = [json.loads(_tool("tools/eval_ppl.py", str(run))) for run in (fsdp2, zero)]
    assert ppl[1]["tokens"] == ppl[0]["tokens"] > 0
    assert ppl[1]["perplexity"] == pytest.approx(ppl[0]["perplexity"], rel=1e-5)
    assert ppl[1]["perplexity"] == pytest.approx(read_metrics(zero, "eval")[-1]["perplexity"], rel=1e-5)

    counts = [json.loads(_tool("tools/count_singular_values.py", str(run), "--json")) for run in (fsdp2, zero)]
    assert counts[0] == counts[1] and sum(counts[0].values()) > 0

    for run, out in ((fsdp2, tmp_path / "a"), (zero, tmp_path / "b")):
        _tool("tools/convert_to_hf.py", str(run), "--out", str(out))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # the two trainings agree to float noise (Adam's first steps amplify it on a few
        # near-zero gradient entries, so compare whole tensors)
        assert float((b[key] - a[key]).norm() / a[key].norm()) < 1e-4, key
    # and the export is exactly the DeepSpeed run's own merged weights
    cfg, merged = load_merged_model(zero)
    want = to_hf_names(merged.state_dict(), cfg.model.tie_embeddings)
    assert want.keys() == b.keys() and all(torch.equal(b[k], want[k]) for k in want)


# --------------------------------------------------------------------------------------------
# Restarts on 2 ranks, step by step through the real Trainer: function preserved, master copies
# and moments reset, the next step's loss as FSDP2's.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restart_worker(rank: int, overrides: list[str], port: int, out_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from megamora.adapters import LoRALinear, iter_adapters
    from megamora.distributed import init_distributed
    from megamora.engines.tensors import optimizer_state, seed_for
    from megamora.model import kaiming_uniform_init
    from megamora.run import build_trainer

    cfg = load_config(None, overrides)
    trainer, _ = build_trainer(cfg, init_distributed(cfg.parallel))
    engine = trainer.engine
    # the same probe on every rank (a rank's validation share may be empty)
    probe = torch.randint(0, 1000, (2, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    probe = probe.to(trainer.dist.device)
    deepspeed = cfg.parallel.engine == "deepspeed"
    result = {"losses": [], "restarts": []}

    def probe_loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(engine(probe[:, :-1]).flatten(0, 1).float(),
                                                     probe[:, 1:].flatten()).item()

    while trainer.step < cfg.steps:
        trainer.set_lr()
        result["losses"] += trainer.mean_losses([trainer.train_step()[0]])
        trainer.step += 1
        if not trainer.restarts.due(trainer.step):
            continue
        before = probe_loss()
        trainer.restarts.apply(trainer.step, engine.module, engine.optimizer)
        record = {"before": before, "after": probe_loss(), "stale": [], "moments": {}}
        for name, layer in iter_adapters(engine.module):
            for pname, p in layer.named_parameters():
                if pname.startswith("base."):
                    continue
                if deepspeed:  # DeepSpeed's own API, not the project's helper: the fp32 master copy
                    from deepspeed.utils import safe_get_full_fp32_param

                    master = safe_get_full_fp32_param(p)
                else:
                    master = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
                want = torch.zeros_like(master)
                if isinstance(layer, LoRALinear) and pname == "lora_A":  # redrawn from (seed, name, restart)
                    key = f"{name}@restart{trainer.restarts.count}"
                    kaiming_uniform_init(want, torch.Generator().manual_seed(seed_for(cfg.seed, key)))
                if not torch.equal(master, want):
                    record["stale"].append(f"{name}.{pname}")
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = optimizer_state(engine.optimizer, p, key)
                    record["moments"][f"{name}.{pname}:{key}"] = moment.clone()
                    if moment.abs().max() != 0:
                        record["stale"].append(f"{name}.{pname}:{key}")
        result["restarts"].append(record)
    trainer.save()
    trainer.metrics.close()
    if rank == 0:
        torch.save(result, out_file)
    dist.barrier()
    dist.destroy_process_group()


def _run_restarts(run_dir: Path, overrides: list[str]) -> dict:
    out = run_dir.with_suffix(".pt")
    spawn_ranks(_restart_worker, overrides, _free_port(), str(out), nprocs=2)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_remora_restarts_under_zero_match_fsdp2(shared_data, tmp_path, stage):
    from megamora.analysis import delta_weights, rank_of
    from megamora.export import initial_weights, load_merged_model

    base = ["adapter.kind=mora", "adapter.r=4", "adapter.dropout=0.0", "steps=12", "restarts.every=4",
            "restarts.warmup=1", "eval_every=0", "save_every=0"]
    fsdp2 = _run_restarts(tmp_path / "fsdp2", tiny_overrides(shared_data, tmp_path / "fsdp2", *base))
    zero = _run_restarts(tmp_path / "zero", tiny_overrides(shared_data, tmp_path / "zero", *base, *DS,
                                                           f"parallel.zero_stage={stage}"))
    assert len(zero["restarts"]) == len(fsdp2["restarts"]) == 2
    for record in zero["restarts"]:
        assert record["after"] == pytest.approx(record["before"], rel=1e-5)  # the function is unchanged
        assert record["stale"] == []  # M's fp32 master = 0, moments reset
    assert len(zero["losses"]) == 12
    for step, (got, want) in enumerate(zip(zero["losses"], fsdp2["losses"]), start=1):
        # incl. the steps right after each restart. Gradients that differ in the last bits (ZeRO reduces
        # one flat buffer) reach ~1.5e-5 by step 11 through the freshly reset moments (fused AdamW).
        assert got == pytest.approx(want, rel=5e-5), step

    _, merged = load_merged_model(tmp_path / "zero")
    deltas = delta_weights(initial_weights(tmp_path / "zero"), merged.state_dict())
    assert len(deltas) == 7 * 2
    for name, dw in deltas.items():
        r_hat = round(((dw.shape[0] + dw.shape[1]) * 4) ** 0.5)
        assert r_hat < rank_of(dw) <= min(dw.shape), name


def test_relora_restart_under_zero3_prunes_moments_as_fsdp2(shared_data, tmp_path):
    """LoRA's restart under ZeRO-3 with ReLoRA's random pruning: A redrawn and B = 0 in the fp32
    master copies, the pruned moments equal FSDP2's, and so does the next step's loss. (Pruned
    moments with the step kept make the following updates large enough to amplify float noise, so
    later steps are not compared.)"""
    base = ["adapter.kind=lora", "adapter.r=4", "adapter.dropout=0.0", "steps=4", "restarts.every=3",
            "restarts.warmup=1", "restarts.optimizer_reset=random_prune", "restarts.prune_ratio=0.5",
            "eval_every=0", "save_every=0"]
    fsdp2 = _run_restarts(tmp_path / "fsdp2", tiny_overrides(shared_data, tmp_path / "fsdp2", *base))
    zero = _run_restarts(tmp_path / "zero", tiny_overrides(shared_data, tmp_path / "zero", *base, *DS,
                                                           "parallel.zero_stage=3"))
    (got,), (want,) = zero["restarts"], fsdp2["restarts"]
    assert got["after"] == pytest.approx(got["before"], rel=1e-5)
    assert [s for s in got["stale"] if ":" not in s] == []  # A, B as re-initialised, in the master copies
    assert got["moments"].keys() == want["moments"].keys() and len(got["moments"]) == 2 * 2 * 7 * 2
    for key, moment in want["moments"].items():
        assert torch.equal(got["moments"][key] == 0, moment == 0), key  # the same random mask
        torch.testing.assert_close(got["moments"][key], moment, rtol=1e-4, atol=1e-4 * float(moment.abs().max()), msg=lambda m: f"{key}: {m}")
    assert zero["losses"] == pytest.approx(fsdp2["losses"], rel=1e-5)  # steps 1-4: 4 is after the restart


# --------------------------------------------------------------------------------------------
# ZeRO-3 start-up: partitioned from the meta device, seeded values as one process


def _init_worker(rank: int, overrides: list[str], port: int, out_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from megamora.adapters import apply_adapters
    from megamora.distributed import init_distributed
    from megamora.engines import build_engine
    from megamora.engines.tensors import full_tensor
    from megamora.model import build_model, materialize
    from megamora.optim import build_optimizer

    cfg = load_config(None, overrides)
    info = init_distributed(cfg.parallel)
    engine = build_engine(cfg, info)
    model = build_model(cfg.model, device="meta")
    apply_adapters(model, cfg.adapter)
    engine.shard(model)
    materialize(model, info.device, cfg.seed, cfg.model.init_std)
    # what this rank holds of each parameter once it has its values: full tensors, or partitions
    held = {name: (p.data.numel(), p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None)
            for name, p in model.named_parameters()}
    engine.setup(model, build_optimizer(model, cfg.optim))
    full = {name: full_tensor(p).clone() for name, p in engine.module.named_parameters()}  # collective
    if rank == 0:
        torch.save({"held": held, "full": full, "tied": engine.module.lm_head.weight is engine.module.embed_tokens.weight},
                   out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_zero3_partitions_from_meta_with_the_one_process_init(tmp_path, kind):
    """ZeRO-3 never materialises a whole parameter set on a rank (each holds its partitions only
    when the seeded init has run), and the weights it starts from are exactly one process's
    (frozen base weights, adapters and a tied embedding included)."""
    from megamora.adapters import apply_adapters
    from megamora.model import build_model, materialize

    overrides = ["run_dir=unused", "global_batch_size=4", "micro_batch_size=2", "model.dim=32", "model.ffn_dim=64",
                 "model.n_layers=2", "model.n_heads=2", "model.vocab_size=512", "model.tie_embeddings=true",
                 *KINDS[kind], *DS, "parallel.zero_stage=3"]
    out = tmp_path / "init.pt"
    spawn_ranks(_init_worker, overrides, _free_port(), str(out), nprocs=2)
    got = torch.load(out, weights_only=True)

    cfg = load_config(None, overrides)
    plain = build_model(cfg.model, device="meta")
    apply_adapters(plain, cfg.adapter)
    materialize(plain, torch.device("cpu"), cfg.seed, cfg.model.init_std)
    want = dict(plain.named_parameters())
    assert got["tied"] and got["full"].keys() == want.keys() == got["held"].keys()
    for name, p in want.items():
        assert torch.equal(got["full"][name], p.detach()), name
        full_held, partition = got["held"][name]
        assert full_held == 0 and partition == -(-p.numel() // 2), name  # half of it, padded


def test_zero3_bf16_matches_one_process_bf16(shared_data, tmp_path):
    """ZeRO-3 in bf16 (fp32 partitions, bf16 compute through autocast) on 2 ranks trains as one process
    in bf16 (autocast): the same bf16 values of the same weights; the weights differ after the first
    step by the engines' fp32 reduction order, which bf16 rounding can amplify: rel 2e-3."""
    bf16 = ["parallel.param_dtype=bfloat16", "steps=4", "eval_every=0", "save_every=0", *KINDS["mora"]]
    plain = run_in_process(tiny_overrides(shared_data, tmp_path / "plain", *bf16))
    launch(tiny_overrides(shared_data, tmp_path / "zero", *bf16, *DS, "parallel.zero_stage=3"), nproc=2)
    got = losses(tmp_path / "zero")
    assert sorted(got) == [1, 2, 3, 4]
    assert got[1] == pytest.approx(plain.losses[0], rel=1e-5)  # the same initial weights, cast alike
    assert [got[s] for s in sorted(got)] == pytest.approx(plain.losses, rel=2e-3)


# --------------------------------------------------------------------------------------------
# Resume


RESUME = {
    "zero2-remora-across-restart": ["parallel.zero_stage=2", "adapter.kind=mora", "adapter.r=4", "restarts.every=2",
                                    "restarts.warmup=1"],
    "zero3-lora-dropout": ["parallel.zero_stage=3", "adapter.kind=lora", "adapter.r=4", "adapter.dropout=0.1"],
}


@pytest.mark.parametrize("extra", RESUME.values(), ids=RESUME.keys())
def test_killed_deepspeed_run_resumes_bitwise(shared_data, tmp_path, extra):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    launch(tiny_overrides(shared_data, whole, *DS, *extra), nproc=2)
    launch(tiny_overrides(shared_data, killed, *DS, *extra), nproc=2)
    crash_after_first_checkpoint(killed)  # killed after its step-3 checkpoint
    launch(tiny_overrides(shared_data, killed, *DS, *extra), nproc=2)
    assert losses(killed) == losses(whole)  # bit for bit
    assert read_metrics(killed, "eval")[-1]["perplexity"] == read_metrics(whole, "eval")[-1]["perplexity"]
    assert read_metrics(killed, "setup")[-1]["resumed_from"].endswith("step_00000003")
    state = json.loads((killed / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["engine"] == "deepspeed" and state["world_size"] == 2


def test_one_process_deepspeed_equals_one_process_fsdp2(shared_data, tmp_path):
    """`python launch/pretrain.py ... parallel.engine=deepspeed` without a launcher: a group of one."""
    extra = ["adapter.kind=mora", "adapter.r=4"]
    plain = run_in_process(tiny_overrides(shared_data, tmp_path / "plain", *extra))
    zero = run_in_process(tiny_overrides(shared_data, tmp_path / "zero", *extra, *DS))
    assert zero.losses == pytest.approx(plain.losses, rel=1e-5)
    assert not torch.distributed.is_initialized()  # the group of one is gone again


# --------------------------------------------------------------------------------------------
# Config and bad input


def test_generated_deepspeed_config_states_batch_sizes_once(tmp_path):
    cfg = load_config(None, ["run_dir=x", "global_batch_size=32", "micro_batch_size=4", "optim.grad_clip=0.5",
                             *DS, "parallel.zero_stage=3", "parallel.reduce_dtype=bfloat16"])
    ds = deepspeed_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 3}
    assert ds["communication_data_type"] == "bf16" and not ds["bf16"]["enabled"]
    assert ds["zero_force_ds_cpu_optimizer"] is False  # ZeRO-Offload steps the project's AdamW
    forced = tmp_path / "forced.json"
    forced.write_text(json.dumps({"zero_force_ds_cpu_optimizer": True}))
    cfg.parallel.deepspeed_config = str(forced)
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        deepspeed_config(cfg, world_size=2)

    override = tmp_path / "offload.json"
    override.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    cfg.parallel.deepspeed_config = str(override)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}  # merged key by key
    for example in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        cfg.parallel.deepspeed_config = str(example)
        assert deepspeed_config(cfg, world_size=2)["zero_optimization"]["stage"] == 3, example


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_engine_input_is_one_line_before_anything_is_written(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{stage: 3")
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"train_batch_size": 64}))
    for extra, needles in [
        (["parallel.engine=megatron"], ["parallel.engine", "megatron"]),
        ([*DS, "parallel.zero_stage=4"], ["parallel.zero_stage", "4"]),
        ([*DS, f"parallel.deepspeed_config={tmp_path}/none.json"], ["none.json"]),
        ([*DS, f"parallel.deepspeed_config={bad_json}"], ["bad.json", "JSON"]),
        ([*DS, f"parallel.deepspeed_config={owned}"], ["train_batch_size", "global_batch_size"]),
        ([*DS, "parallel.compile=true"], ["parallel.compile", "fsdp2"]),
    ]:
        _one_line_error(launch(tiny_overrides(shared_data, run_dir, *extra), check=False), *needles)
        assert not run_dir.exists()

    # a run directory written by FSDP2 is not resumed by DeepSpeed, and stays as it was
    launch(tiny_overrides(shared_data, run_dir, "steps=3"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    _one_line_error(launch(tiny_overrides(shared_data, run_dir, *DS), check=False), "fsdp2", "deepspeed")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_deepspeed_not_installed_says_how_to_install(shared_data, tmp_path):
    shim = tmp_path / "shim" / "deepspeed"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'deepspeed'\")\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"),
                           *tiny_overrides(shared_data, tmp_path / "run", *DS)],
                          capture_output=True, text=True, env=env, timeout=120)
    _one_line_error(proc, "parallel.engine=deepspeed", "pip install", "[deepspeed]")
    assert not (tmp_path / "run").exists()


def test_config_rejects_unknown_engine_and_stage():
    for bad, needle in [("parallel.engine=ddp", "parallel.engine"), ("parallel.zero_stage=0", "parallel.zero_stage")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ["run_dir=x", bad])


def test_deepspeed_launcher_runs_the_same_training_as_torchrun(runs, shared_data, tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    run_dir = tmp_path / "ds-launcher"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(launcher), "--num_gpus", "2", str(REPO / "launch" / "pretrain.py"),
                           *tiny_overrides(shared_data, run_dir, f"steps={STEPS}", "save_every=5", *KINDS["mora"], *DS,
                                           "parallel.zero_stage=2")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(run_dir, "setup")[0]["world_size"] == 2
    assert losses(run_dir) == pytest.approx(losses(runs["mora", "2"]), rel=1e-6)
