"""Start-up at scale without the full model on every rank (issue 16, item 9), on 2 gloo ranks:
a warm start from an FSDP2 checkpoint or a Hugging Face folder loads straight into the sharded
model (never through a full CPU copy) and gives exactly the one-process weights; a resume skips
drawing initial values its checkpoint overwrites."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import megamora.checkpoint as checkpoint
from megamora.adapters import apply_adapters, base_parameters
from megamora.config import AdapterConfig, ModelConfig
from megamora.engines.fsdp2 import _dcp
from megamora.hf import save_hf
from megamora.model import build_model, init_weights
from spawn_ranks import spawn_ranks

MODEL = ModelConfig(dim=32, ffn_dim=72, n_layers=2, n_heads=4, vocab_size=97)
ADAPTER = AdapterConfig(kind="mora", r=5, dropout=0.0)


def sharded(adapter: AdapterConfig | None):
    model = build_model(MODEL, device="meta")
    if adapter is not None:
        apply_adapters(model, adapter)
    if dist.is_initialized():
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    model.to_empty(device="cpu")
    model.tie_weights()
    init_weights(model, seed=0)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def save_warm_starts(rank: int, tmp, port: int) -> None:
    """A full-rank model of seed 7, saved by 2 ranks as a DCP checkpoint, and its HF folder."""
    join(rank, port)
    source = build_model(MODEL, device="meta")
    for block in source.layers:
        fully_shard(block)
    fully_shard(source)
    source.to_empty(device="cpu")
    init_weights(source, seed=7)
    _dcp(dcp.save, {"model": get_model_state_dict(source)}, tmp / "ckpt")
    plain = build_model(MODEL, device="cpu")
    plain.load_state_dict({k: full(v) for k, v in source.state_dict().items()})
    if rank == 0:
        (tmp / "ckpt" / "trainer_state.json").write_text(json.dumps({"step": 1, "engine": "fsdp2"}))
        save_hf(plain, MODEL, tmp / "hf")
        torch.save(plain.state_dict(), tmp / "expected.pt")
    dist.barrier()


def warm_start_sharded(rank: int, tmp, port: int, source: str) -> None:
    join(rank, port)

    def no_full_copy(*args, **kwargs):
        raise AssertionError("the warm start built a full copy of the model")

    checkpoint._load_through_full_copy = no_full_copy  # this rank's process only
    model = sharded(ADAPTER)
    base = {id(p) for p in base_parameters(model).values()}
    adapters_before = {n: full(p).clone() for n, p in model.named_parameters() if id(p) not in base}
    assert adapters_before
    checkpoint.load_base_weights(tmp / source, model)
    expected = torch.load(tmp / "expected.pt", weights_only=True)
    for name, p in base_parameters(model).items():
        assert isinstance(p, DTensor), name
        assert torch.equal(full(p), expected[name]), name
    for n, p in model.named_parameters():  # the adapters keep their own initial values
        if n in adapters_before:
            assert torch.equal(full(p), adapters_before[n]), n


def join(rank: int, port: int) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)


@pytest.fixture(scope="module")
def warm_starts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    spawn_ranks(save_warm_starts, tmp, 29641)
    return tmp


@pytest.mark.parametrize("source", ["ckpt", "hf"])
def test_warm_start_loads_into_shards_without_a_full_copy(warm_starts, source):
    spawn_ranks(warm_start_sharded, warm_starts, 29642 if source == "ckpt" else 29643, source)


def test_warm_start_one_process_equals_the_checkpoint(warm_starts):
    model = sharded(ADAPTER)  # no process group: plain tensors, the same DCP path
    checkpoint.load_base_weights(warm_starts / "ckpt", model)
    expected = torch.load(warm_starts / "expected.pt", weights_only=True)
    for name, p in base_parameters(model).items():
        assert torch.equal(p.detach(), expected[name]), name


def test_warm_start_from_an_adapter_checkpoint_is_refused(warm_starts, tmp_path):
    """An adapter run's checkpoint (other keys) is one line naming why, before any weight is read."""
    model = sharded(ADAPTER)
    _dcp(dcp.save, {"model": get_model_state_dict(model)}, tmp_path / "mora")
    (tmp_path / "mora" / "trainer_state.json").write_text(json.dumps({"step": 1, "engine": "fsdp2"}))
    with pytest.raises(ValueError, match="is not a full-rank checkpoint of this model's shapes: missing keys"):
        checkpoint.load_base_weights(tmp_path / "mora", sharded(ADAPTER))


def test_base_parameters_are_the_plain_models():
    """Under the plain model's names, tied weights once, no adapter parameter."""
    plain = dict(build_model(MODEL, device="meta").named_parameters())
    assert base_parameters(sharded(ADAPTER)).keys() == plain.keys()
    assert base_parameters(sharded(None)).keys() == plain.keys()


def test_resume_draws_no_initial_values(shared_data, tmp_path, monkeypatch):
    """A resume of an FSDP2 run loads every parameter: drawing their initial values first is wasted
    start-up (minutes at 7B); the resumed run still trains what an uninterrupted one does."""
    import megamora.model as model_module
    from megamora.config import load_config
    from megamora.run import pretrain
    from test_train import tiny_overrides

    def args(run: str, *extra: str) -> list[str]:
        return tiny_overrides(shared_data, tmp_path / run, "adapter.kind=mora", "adapter.r=4", "eval_every=0", *extra)

    whole = pretrain(load_config(None, args("whole")))
    pretrain(load_config(None, args("run", "steps=3")))
    draws = []
    real = model_module.seeded_fill_
    monkeypatch.setattr(model_module, "seeded_fill_", lambda *a: (draws.append(a[-1]), real(*a)))
    resumed = pretrain(load_config(None, args("run")))
    assert resumed.resumed_from is not None and draws == []
    assert resumed.losses == whole.losses[3:]


def draw_once_in_all(rank: int, port: int) -> None:
    import megamora.engines.tensors as tensors

    join(rank, port)
    drawn: list[str] = []
    real = tensors.seed_for
    tensors.seed_for = lambda seed, key: (drawn.append(key), real(seed, key))[1]
    model = sharded(ADAPTER)
    tensors.seed_for = real
    everyone: list[list[str]] = [[], []]
    dist.all_gather_object(everyone, drawn)
    assert not set(everyone[0]) & set(everyone[1]) and all(everyone)  # each tensor drawn by one rank
    plain = build_model(MODEL, device="meta")
    apply_adapters(plain, ADAPTER)
    plain.to_empty(device="cpu")
    plain.tie_weights()
    init_weights(plain, seed=0)
    assert sorted(everyone[0] + everyone[1]) == sorted(drawn_by_one_process(plain))
    expected = plain.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(full(value), expected[name]), name


def drawn_by_one_process(plain) -> list[str]:
    import megamora.engines.tensors as tensors

    drawn: list[str] = []
    real = tensors.seed_for
    tensors.seed_for = lambda seed, key: (drawn.append(key), real(seed, key))[1]
    try:
        init_weights(plain, seed=0)
    finally:
        tensors.seed_for = real
    return drawn


def test_sharded_init_draws_each_tensor_once_in_all():
    """2 ranks draw the model once between them (not once each), and get the one-process values."""
    spawn_ranks(draw_once_in_all, 29644)
