import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamora.config import ConfigError, load_config, to_dict, to_yaml

REQUIRED = ["run_dir=runs/x"]
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ENTRY = REPO / "launch" / "pretrain.py"
TABLE3_METHODS = ("full", "lora", "mora", "relora", "remora")
CPU_METHODS = (*TABLE3_METHODS, "mora-type6", "galore", "apollo")


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_entry", ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yaml_then_overrides_then_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: r\nmodel:\n  preset: 250m\n  n_layers: 3\noptim:\n  lr: 1e-3\n")
    cfg = load_config(path, ["optim.lr=2e-3", "adapter.kind=mora", "adapter.mora_type=rotation"])
    assert (cfg.model.dim, cfg.model.ffn_dim, cfg.model.n_layers, cfg.model.n_heads) == (768, 2560, 3, 16)
    assert cfg.optim.lr == 2e-3 and cfg.adapter.kind == "mora" and cfg.adapter.mora_type == "rotation"
    # the resolved config round-trips through YAML
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize("overrides,needle", [
    (["model.foo=1"], "model.foo"),
    (["stpes=10"], "stpes"),
    (["steps=ten"], "steps"),
    (["steps=0"], "steps=0"),
    (["optim.lr=-1"], "optim.lr=-1"),
    (["adapter.kind=dorra"], "adapter.kind='dorra'"),
    (["model.preset=5m"], "model.preset='5m'"),
    (["model.n_heads=5"], "model.n_heads=5"),
    (["adapter.kind=lora", "adapter.target_modules=[q_proj,qkv]"], "qkv"),
    (["restarts.every=100"], "restarts.every"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["steps"], "steps"),
])
def test_bad_key_or_value_is_a_one_line_error_naming_it(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_missing_run_dir_and_missing_file():
    with pytest.raises(ConfigError, match="run_dir"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml", REQUIRED)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_files_merge_in_order_then_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", "run_dir: base\nsteps: 100\noptim:\n  lr: 1e-3\n  warmup_steps: 10\n"
                                         "adapter:\n  target_modules: [q_proj, v_proj]\n")
    delta = write(tmp_path / "delta.yaml", "run_dir: delta\noptim:\n  lr: 2e-3\n"
                                           "adapter:\n  kind: lora\n  target_modules: [o_proj]\n")
    cfg = load_config([base, delta])
    assert cfg.run_dir == "delta" and cfg.steps == 100  # the later file wins; the rest stays
    assert cfg.optim.lr == 2e-3 and cfg.optim.warmup_steps == 10  # merged key by key inside a section
    assert cfg.adapter.kind == "lora" and cfg.adapter.target_modules == ["o_proj"]  # a list is replaced whole
    assert load_config([delta, base]).run_dir == "base"
    cfg = load_config((str(base), str(delta)), ["optim.lr=3e-3", "run_dir=cli"])
    assert cfg.optim.lr == 3e-3 and cfg.run_dir == "cli"  # overrides win over every file
    assert load_config([base]) == load_config(base) == load_config(str(base))


def test_preset_from_a_later_file_applies(tmp_path):
    base = write(tmp_path / "base.yaml", "run_dir: r\nmodel:\n  preset: 9m\n  n_layers: 2\n")
    delta = write(tmp_path / "delta.yaml", "model:\n  preset: 250m\n")
    m = load_config([base, delta]).model
    # the later preset fills the shape; a field a file sets explicitly stays
    assert (m.dim, m.ffn_dim, m.n_layers, m.n_heads) == (768, 2560, 2, 16)
    m = load_config([write(tmp_path / "plain.yaml", "run_dir: r\n"), delta]).model
    assert (m.dim, m.n_layers) == (768, 24)


def test_missing_second_file_is_a_one_line_error(tmp_path):
    base = write(tmp_path / "base.yaml", "run_dir: r\n")
    with pytest.raises(ConfigError) as info:
        load_config([base, tmp_path / "nope.yaml"])
    assert "config file not found" in str(info.value) and "nope.yaml" in str(info.value)
    assert "\n" not in str(info.value)


def test_shipped_configs_load():
    # whole files: the smoke configs; base + delta: the recipes (a delta alone is not a run)
    smoke = sorted((CONFIGS / "smoke").glob("*.yaml"))
    assert len(smoke) >= 5
    for f in smoke:
        assert load_config(f).steps > 0, f
    recipes = {CONFIGS / "table3" / "250m": TABLE3_METHODS, CONFIGS / "table3" / "1b": TABLE3_METHODS,
               CONFIGS / "cpu": CPU_METHODS}
    for folder, methods in recipes.items():
        assert {p.stem for p in folder.glob("*.yaml")} == {"base", *methods}, folder
        for m in methods:
            cfg = load_config([folder / "base.yaml", folder / f"{m}.yaml"])
            assert cfg.run_dir.endswith(m), (folder, m)


@pytest.mark.parametrize("size,preset,micro", [("250m", "250m", 32), ("1b", "1b", 16)])
def test_table3_base_plus_delta_is_the_paper_setting(size, preset, micro):
    folder = CONFIGS / "table3" / size
    cfgs = {m: load_config([folder / "base.yaml", folder / f"{m}.yaml"]) for m in TABLE3_METHODS}
    full = cfgs["full"]
    assert full.adapter.kind == "none" and full.restarts.every == 0 and full.run_dir == f"runs/table3-{size}-full"
    assert (full.steps, full.global_batch_size, full.micro_batch_size, full.data.seq_len) == (10000, 1024, micro, 512)
    assert (full.model.preset, full.data.tokenizer, full.parallel.param_dtype) == (preset, "t5-base", "bfloat16")
    assert (full.optim.lr, full.optim.warmup_steps, full.optim.min_lr_ratio, full.optim.grad_clip) == (5e-4, 1000, 0.0, 1.0)
    for m, cfg in cfgs.items():  # the methods differ only in adapter, restarts and run_dir
        d, f = to_dict(cfg), to_dict(full)
        assert {k for k in d if d[k] != f[k]} <= {"adapter", "restarts", "run_dir"}, m
    mora = cfgs["mora"].adapter
    assert (mora.kind, mora.r, mora.mora_type, mora.dropout) == ("mora", 128, "1", 0.05)
    lora = cfgs["lora"].adapter
    assert (lora.kind, lora.r, lora.alpha) == ("lora", 128, 64.0)
    assert cfgs["relora"].adapter == lora and cfgs["remora"].adapter == mora
    for m in ("relora", "remora"):
        r = cfgs[m].restarts
        assert (r.every, r.optimizer_reset, r.lr, r.warmup) == (2000, "delete", "restart_warmup", 50)
    assert cfgs["remora"].restarts.mora_types == ["1", "2", "3", "4"]


def test_cpu_recipe():
    folder = CONFIGS / "cpu"
    cfgs = {m: load_config([folder / "base.yaml", folder / f"{m}.yaml"]) for m in CPU_METHODS}
    full = cfgs["full"]
    assert (full.model.preset, full.model.dim, full.model.vocab_size, full.data.seq_len) == ("20m", 256, 8000, 128)
    assert full.data.tokenizer.endswith("tokenizers/c4-sample-8k/spiece.model")
    assert (full.steps, full.global_batch_size, full.optim.warmup_steps, full.parallel.param_dtype) == (
        300, 16, 30, "float32")
    assert full.warm_start is None  # set per seed by the reproduction, not by the recipe
    optimizer_methods = {"galore": "galore_adamw", "apollo": "apollo_adamw"}
    for m, cfg in cfgs.items():
        d, f = to_dict(cfg), to_dict(full)
        # an adapter method changes the adapter (and restarts); an optimizer-level one only the optimizer
        allowed = {"optim", "run_dir"} if m in optimizer_methods else {"adapter", "restarts", "run_dir"}
        assert {k for k in d if d[k] != f[k]} <= allowed, m
        a = cfg.adapter
        assert a.train_embeddings and a.train_head and a.train_norms  # as in Table 3
        if m in optimizer_methods:
            assert cfg.optim.name == optimizer_methods[m], m
            assert getattr(cfg.optim, m).rank == 40, m  # as the adapters' r
            assert {k for k in d["optim"] if d["optim"][k] != f["optim"][k]} <= {"name", "lr", "eps", m}, m
        elif m != "full":
            assert a.r == 40 and a.dropout == 0.05, m  # r / hidden about 1/6
    assert (cfgs["lora"].adapter.kind, cfgs["lora"].adapter.alpha) == ("lora", 16.0)
    assert cfgs["mora"].adapter.mora_type == "1" and cfgs["mora-type6"].adapter.mora_type == "6"
    for m in ("relora", "remora"):
        r = cfgs[m].restarts
        assert (r.every, r.warmup, r.lr, r.optimizer_reset) == (75, 10, "restart_warmup", "delete")
        assert full.steps // r.every >= 3  # at least three merges
    assert cfgs["remora"].restarts.mora_types == ["1", "2", "3", "4"]


@pytest.mark.parametrize("argv", [
    ["--config", "a.yaml", "b.yaml", "steps=5", "optim.lr=1e-3"],
    ["steps=5", "--config", "a.yaml", "b.yaml", "optim.lr=1e-3"],
    ["steps=5", "optim.lr=1e-3", "--config", "a.yaml", "b.yaml"],
    ["--config", "a.yaml", "steps=5", "--config", "b.yaml", "optim.lr=1e-3"],
    ["--config", "a.yaml", "--dry-run", "steps=5", "--config", "b.yaml", "optim.lr=1e-3"],
])
def test_cli_takes_several_configs_and_overrides_anywhere(argv):
    args = _pretrain_module().parse_args(argv)
    assert args.config == ["a.yaml", "b.yaml"]
    assert args.overrides == ["steps=5", "optim.lr=1e-3"]  # in command-line order: a later one wins
    assert args.dry_run == ("--dry-run" in argv)


def test_cli_one_config_or_none():
    parse = _pretrain_module().parse_args
    assert parse(["--config", "a.yaml", "run_dir=x"]).config == ["a.yaml"]
    args = parse(["run_dir=x", "steps=3", "--local_rank=0"])
    assert args.config is None and args.overrides == ["run_dir=x", "steps=3"]


def test_dry_run_with_base_and_delta(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    folder = CONFIGS / "cpu"
    proc = subprocess.run([sys.executable, str(ENTRY), "--config", str(folder / "base.yaml"),
                           str(folder / "lora.yaml"), f"run_dir={tmp_path}/x", "steps=50", "--dry-run", "adapter.r=8"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "(lora)" in proc.stdout and "lora r=8" in proc.stdout and "(50 steps)" in proc.stdout
    assert not (tmp_path / "x").exists()
