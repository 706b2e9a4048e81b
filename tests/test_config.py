import pytest

from megamora.config import ConfigError, load_config, to_yaml

REQUIRED = ["run_dir=runs/x"]


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
    (["adapter.kind=dora"], "adapter.kind='dora'"),
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


def test_shipped_configs_load(monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        if "deepspeed" in f.parts:
            continue
        cfg = load_config(f)
        assert cfg.steps > 0, f
