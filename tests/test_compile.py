"""parallel.compile: compiled blocks compute what eager ones do, with adapters, activation
checkpointing, restarts (no stale graph after a merge or a type switch) and FSDP2 on two ranks."""

import pytest
import torch

from megamora import adapters
from megamora.compute import compile_blocks, set_activation_checkpointing
from megamora.config import AdapterConfig, ModelConfig
from megamora.model import build_model, init_weights
from tests.test_train import killed_copy, last_pass, launch, launch_together, losses, tiny_overrides

CFG = ModelConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=4, vocab_size=97)


def adapted_model(adapter: AdapterConfig):
    model = build_model(CFG, device="cpu")
    adapters.apply_adapters(model, adapter)
    init_weights(model, 0)
    perturb_adapters(model, seed=1)
    return model


@torch.no_grad()
def perturb_adapters(model, seed: int) -> None:
    """Non-zero B / M, so the adapters change the output (they start at zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".M") or name.endswith("lora_B"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(eager, compiled, tokens):
    loss_e, grads_e = loss_and_grads(eager, tokens)
    loss_c, grads_c = loss_and_grads(compiled, tokens)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


CASES = {
    "lora-checkpointed": (AdapterConfig(kind="lora", r=4, alpha=8, dropout=0.0), True),
    "mora-sharing": (AdapterConfig(kind="mora", r=4, mora_type="1", dropout=0.0), False),
}


@pytest.mark.parametrize("adapter,checkpointed", CASES.values(), ids=CASES.keys())
def test_compiled_blocks_equal_eager_across_a_restart(adapter, checkpointed):
    eager, compiled = adapted_model(adapter), adapted_model(adapter)
    set_activation_checkpointing(compiled, checkpointed)
    compile_blocks(compiled)
    tokens = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_same(eager, compiled, tokens)
    # A ReLoRA / ReMoRA restart: merge, re-init, and for MoRA the next operator type of the cycle.
    for model in (eager, compiled):
        for name, layer in adapters.iter_adapters(model):
            if adapter.kind == "mora":
                layer.merge_and_reinit(next_type="2")
            else:
                layer.merge_and_reinit(seed=3, key=name)
        perturb_adapters(model, seed=2)
    assert_same(eager, compiled, tokens)
    if adapter.kind == "mora":
        assert all(layer.mora_type == "2" for _, layer in adapters.iter_adapters(compiled))


def test_compiled_two_ranks_match_eager_one_process_and_resume(shared_data, tmp_path):
    """Through the real entry point: FSDP2 on two ranks with compiled blocks, ReMoRA restarts at
    steps 2 and 4, against one eager process; killed after step 3 and resumed (across the step-4
    restart), the compiled run continues bit for bit."""
    remora = ["adapter.kind=mora", "adapter.r=4", "adapter.dropout=0.0", "restarts.every=2", "restarts.warmup=1"]
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    launch_together((tiny_overrides(shared_data, eager_dir, *remora), 1),
                    (tiny_overrides(shared_data, compiled_dir, *remora, "parallel.compile=true"), 2))
    eager, compiled = losses(eager_dir), losses(compiled_dir)
    assert sorted(compiled) == sorted(eager) == list(range(1, 7))
    for step in eager:  # as tight as the eager rank-parity tests (test_train.py); measured 7.1e-7
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-6), step

    resumed_dir = killed_copy(compiled_dir, tmp_path / "resumed")
    launch(tiny_overrides(shared_data, resumed_dir, *remora, "parallel.compile=true"), nproc=2)
    setup, trained = last_pass(resumed_dir)
    assert setup["resumed_from"] == str(resumed_dir / "checkpoints" / "step_00000003") and trained == [4, 5, 6]
    assert losses(resumed_dir) == compiled  # bitwise: the recompiled blocks compute what the first ones did
