"""Perplexity arithmetic, checkpoint rotation / atomicity, activation checkpointing, W_init."""

import math

import pytest
import torch
import torch.nn.functional as F

from megamora.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from megamora.config import TrainConfig
from megamora.distributed import DistInfo
from megamora.engines.fsdp2 import FSDP2Engine
from megamora.config import ModelConfig
from megamora.evaluate import evaluate_loss
from megamora.model import build_model, init_weights, initial_state_dict

CFG = ModelConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=4, vocab_size=50)


def tiny_model():
    model = build_model(CFG, device="cpu")
    init_weights(model, 0, 0.02)
    return model


def test_perplexity_is_token_weighted_over_all_sequences():
    model = tiny_model()
    seqs = torch.randint(0, 50, (7, 9))  # 7 sequences: the last micro-batch of 3 holds one
    loss, tokens = evaluate_loss(model, seqs, micro_batch_size=3, device=torch.device("cpu"))
    with torch.no_grad():
        want = F.cross_entropy(model(seqs[:, :-1]).flatten(0, 1), seqs[:, 1:].flatten())
    assert tokens == 7 * 8
    assert loss == pytest.approx(want.item(), rel=1e-6)
    # the mean of per-batch means would differ: the batches hold 3, 3 and 1 sequences
    with torch.no_grad():
        batch_means = [F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).item()
                       for b in seqs.split(3)]
    assert abs(sum(batch_means) / 3 - loss) > 1e-6
    assert math.isfinite(math.exp(loss))


def test_rank_shares_are_token_weighted_together():
    model = tiny_model()
    seqs = torch.randint(0, 50, (5, 9))
    parts = [evaluate_loss(model, share, 2, torch.device("cpu")) for share in (seqs[:3], seqs[3:])]
    # without a process group each rank reports its own share; together they are the whole
    total = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    assert sum(n for _, n in parts) == 5 * 8
    assert total == pytest.approx(evaluate_loss(model, seqs, 2, torch.device("cpu"))[0], rel=1e-6)


def test_keep_last_and_unfinished_saves_are_ignored(tmp_path):
    model = tiny_model()
    engine = FSDP2Engine(TrainConfig(run_dir=str(tmp_path)), DistInfo(0, 1, 0, torch.device("cpu")))
    engine.setup(model, torch.optim.AdamW(model.parameters()))
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, engine, {"num_streams": 1}, {"0": {"x": step}}, keep_last=2, is_main=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # a save that died half-way leaves only a .tmp directory, which is never taken as the latest
    (tmp_path / "checkpoints" / ".tmp-step_00000004").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert (latest_checkpoint(tmp_path) / "data" / "stream_0.json").read_text() == '{"x": 3}'


def test_activation_checkpointing_gives_the_same_gradients():
    from megamora.compute import set_activation_checkpointing

    x = torch.randint(0, 50, (2, 8))
    grads = []
    for enabled in (False, True):
        model = tiny_model()
        set_activation_checkpointing(model, enabled)
        model(x).float().pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_initial_weights_of_an_adapted_run_are_reproducible():
    from megamora.adapters import apply_adapters
    from megamora.analysis import plain_name
    from megamora.config import AdapterConfig
    from megamora.model import materialize

    model = build_model(CFG, device="meta")
    apply_adapters(model, AdapterConfig(kind="mora", r=4))
    materialize(model, torch.device("cpu"), 3, 0.02)
    w_init = initial_state_dict(CFG, 3)
    adapted = {plain_name(k): v for k, v in model.state_dict().items() if not k.endswith(".M")}
    assert adapted.keys() == w_init.keys()
    for k, v in w_init.items():
        assert torch.equal(adapted[k], v), k


def test_metrics_jsonl_always_and_wandb_offline(tmp_path):
    from megamora.metrics import MetricsLogger, read_metrics

    logger = MetricsLogger(tmp_path, enabled=True, wandb_mode="disabled", wandb_project="p", config={})
    logger.log(1, {"loss": 2.5, "data": {"docs_read": 3}})
    logger.close()
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 1, "loss": 2.5, "data": {"docs_read": 3}}]
    assert not (tmp_path / "wandb").exists()

    pytest.importorskip("wandb")  # optional extra: `pip install -e .[wandb]`
    logger = MetricsLogger(tmp_path, enabled=True, wandb_mode="offline", wandb_project="p", config={"a": 1})
    logger.log(2, {"loss": 2.0})
    logger.close()
    assert any((tmp_path / "wandb").glob("offline-run-*"))
