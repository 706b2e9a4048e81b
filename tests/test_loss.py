"""The chunked output layer + cross-entropy equals the plain one: loss and both gradients."""

import pytest
import torch
import torch.nn.functional as F

import megamora.loss as loss_module
from megamora.config import ModelConfig
from megamora.loss import linear_cross_entropy
from megamora.model import build_model, init_weights


def reference(hidden, weight, targets, reduction="mean"):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction=reduction)


def inputs(n=37, d=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, targets


def grads(loss_fn, hidden, weight, targets, scale=1.0):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = loss_fn(h, w, targets)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_equals_plain_fp32(chunk, reduction):
    hidden, weight, targets = inputs()  # 37 tokens: chunks of 8 leave a short last one
    ref = grads(lambda h, w, t: reference(h, w, t, reduction), hidden, weight, targets, scale=0.5)
    got = grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk, reduction), hidden, weight, targets, scale=0.5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("scale, shifted", [(1.0, False), (40.0, True)])
def test_logits_with_or_without_the_max_shift(scale, shifted, monkeypatch):
    """Small logits are exp'd unshifted (their bound is checked); large ones (|logit| in the
    hundreds, where exp overflows fp32) take the max shift; both equal the plain loss."""
    hidden, weight, targets = inputs()
    hidden = (hidden.detach() * scale).requires_grad_()
    if shifted:
        assert F.linear(hidden, weight).abs().max() > 100
    shifts = []
    exp_cross_entropy = loss_module._exp_cross_entropy_
    monkeypatch.setattr(loss_module, "_exp_cross_entropy_",
                        lambda *a, shift: shifts.append(shift) or exp_cross_entropy(*a, shift=shift))
    ref = grads(reference, hidden, weight, targets)
    got = grads(lambda h, w, t: linear_cross_entropy(h, w, t, 8), hidden, weight, targets)
    assert shifts == [shifted] * 5  # 37 tokens in chunks of 8
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_head_and_no_grad():
    hidden, weight, targets = inputs()
    weight = weight.detach()  # a frozen head: no weight gradient computed
    h = hidden.detach().clone().requires_grad_()
    linear_cross_entropy(h, weight, targets, 8).backward()
    h_ref = hidden.detach().clone().requires_grad_()
    reference(h_ref, weight, targets).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 8), reference(hidden, weight, targets))


def test_bf16_autocast_matches_plain_autocast():
    hidden, weight, targets = inputs(n=61, d=32, vocab=300)  # chunks of 16, the last one short
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(reference, hidden, weight, targets)
        got = grads(lambda h, w, t: linear_cross_entropy(h, w, t, 16), hidden, weight, targets)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_model_loss_equals_loss_of_its_logits():
    cfg = ModelConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=4, vocab_size=97)
    model = build_model(cfg, device="cpu")
    init_weights(model, 0)
    tokens = torch.randint(0, 97, (3, 11))
    logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    model.lm_head.chunk_size = 7
    torch.testing.assert_close(model(tokens[:, :-1], targets=tokens[:, 1:]), expected, rtol=1e-5, atol=1e-6)
    summed = model(tokens[:, :-1], targets=tokens[:, 1:], reduction="sum")
    torch.testing.assert_close(summed, expected * 30, rtol=1e-5, atol=1e-5)


def test_two_losses_in_one_graph_and_growing_chunks():
    """The CPU scratch buffers are reused across calls: nothing a call returns may live in them."""
    hidden, weight, targets = inputs(n=40)
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (linear_cross_entropy(h[:20], w, targets[:20], 4) + linear_cross_entropy(h[20:], w, targets[20:], 16)).backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (reference(h_ref[:20], w_ref, targets[:20]) + reference(h_ref[20:], w_ref, targets[20:])).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_second_backward_is_refused():
    hidden, weight, targets = inputs()
    loss = linear_cross_entropy(hidden, weight, targets, 8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_bad_reduction_is_one_line():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="reduction='none'"):
        linear_cross_entropy(hidden, weight, targets, 8, reduction="none")
