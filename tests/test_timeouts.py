"""parallel.timeout_s reaches init_process_group, and a bad value is a one-line error before anything
runs (issue 16, item 10)."""

from datetime import timedelta

import pytest

from megamora.config import ConfigError, load_config
from test_train import launch, tiny_overrides


@pytest.fixture
def captured_init(monkeypatch):
    """init_process_group replaced by a recorder: the keyword arguments megamora passes it."""
    import torch.distributed as dist

    from megamora import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    assert distributed.dist is dist
    return calls


@pytest.mark.parametrize("launched", [True, False], ids=["torchrun", "deepspeed-group-of-one"])
def test_timeout_reaches_init_process_group(captured_init, monkeypatch, launched):
    from megamora.distributed import init_distributed

    if launched:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
    else:
        monkeypatch.delenv("RANK", raising=False)
    engine = "fsdp2" if launched else "deepspeed"
    cfg = load_config(None, ["run_dir=x", f"parallel.engine={engine}", "parallel.device=cpu", "parallel.timeout_s=4321"])
    init_distributed(cfg.parallel)
    assert len(captured_init) == 1 and captured_init[0]["timeout"] == timedelta(seconds=4321)


@pytest.mark.parametrize("value", ["0", "-5", "ten"])
def test_bad_timeout_is_one_line(value):
    with pytest.raises(ConfigError, match="parallel.timeout_s") as e:
        load_config(None, ["run_dir=x", f"parallel.timeout_s={value}"])
    assert "\n" not in str(e.value)


def test_bad_timeout_from_the_command_line(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(tiny_overrides(shared_data, run_dir, "parallel.timeout_s=0"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == ["error: parallel.timeout_s=0 must be positive"], proc.stderr
    assert not run_dir.exists()
