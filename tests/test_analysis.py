"""dW extraction and its spectrum, on matrices built with a known rank or known singular values."""

import pytest
import torch

from megamora.analysis import (
    count_above,
    delta_weights,
    module_type,
    rank_of,
    singular_value_counts,
    singular_values,
)


def with_singular_values(m, n, values, seed=0):
    """U diag(values) V^T with random orthonormal U (m x k) and V (n x k)."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def low_rank(m, n, r, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)


def test_delta_weights_names_and_values():
    g = torch.Generator().manual_seed(0)
    q0, down0 = torch.randn(8, 8, generator=g), torch.randn(8, 12, generator=g)
    initial = {
        "layers.0.self_attn.q_proj.weight": q0,
        "layers.0.mlp.down_proj.weight": down0,
        "embed_tokens.weight": torch.zeros(5, 8),
        "norm.weight": torch.ones(8),
    }
    q1, down1 = q0 + low_rank(8, 8, 2), down0 + 1.0
    current = {
        "layers.0.self_attn.q_proj.base.weight": q1,  # an adapted layer's wrapped weight
        "layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),  # adapter factors are not dW
        "_orig_mod.layers.0.mlp.down_proj.weight": down1.to(torch.bfloat16),  # compiled-model prefix
        "embed_tokens.weight": torch.ones(5, 8),  # not a projection
        "norm.weight": torch.zeros(8),
        "layers.1.self_attn.k_proj.weight": torch.ones(8, 8),  # absent initially
    }
    d = delta_weights(initial, current)
    assert sorted(d) == ["layers.0.mlp.down_proj.weight", "layers.0.self_attn.q_proj.weight"]
    assert torch.equal(d["layers.0.self_attn.q_proj.weight"], q1 - q0)
    assert d["layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert torch.allclose(d["layers.0.mlp.down_proj.weight"], down1.bfloat16().float() - down0)
    with pytest.raises(ValueError, match="q_proj"):
        delta_weights(initial, {"layers.0.self_attn.q_proj.weight": torch.zeros(8, 9)})


def test_module_type():
    assert module_type("layers.3.mlp.gate_proj.weight") == "gate_proj"
    assert module_type("layers.3.self_attn.o_proj.base.weight") == "o_proj"
    assert module_type("layers.3.self_attn.o_proj.lora_B.weight") is None
    assert module_type("lm_head.weight") is None


def test_singular_values_known_spectrum():
    values = [5.0, 2.0, 0.5, 0.11, 0.09, 0.01]
    dw = with_singular_values(40, 24, values).float()
    sv = singular_values(dw)
    assert sv.dtype == torch.float32 and sv.shape == (24,)
    assert torch.allclose(sv[:6], torch.tensor(values), atol=1e-5)
    assert torch.all(sv[6:] < 1e-5)
    assert count_above(dw) == 4  # 5, 2, 0.5, 0.11 (0.09 is below the 0.1 threshold)
    assert count_above(dw, threshold=1.0) == 2
    assert count_above(dw.bfloat16(), threshold=1.0) == 2  # any dtype is analysed in fp32
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.ones(3))


def test_rank_of_constructed_matrices():
    assert rank_of(low_rank(64, 48, 5, dtype=torch.float64)) == 5
    # an fp32 product carries fp32 rounding noise; the default tolerance follows the dtype
    assert rank_of(low_rank(64, 48, 5)) == 5
    # ... so an fp32 result cast to fp64 needs an explicit rtol (its noise is fp32-sized)
    assert rank_of(low_rank(64, 48, 5).double()) > 5
    assert rank_of(low_rank(64, 48, 5).double(), rtol=1e-5) == 5
    # a sum of two independent rank-r updates has rank 2r, capped by the shape
    assert rank_of(low_rank(64, 48, 7, seed=1) + low_rank(64, 48, 7, seed=2)) == 14
    assert rank_of(low_rank(64, 48, 30, seed=1) + low_rank(64, 48, 30, seed=2)) == 48
    assert rank_of(torch.zeros(6, 4)) == 0
    # tiny but genuine singular values count unless rtol says otherwise
    dw = with_singular_values(20, 20, [1.0, 1e-3, 1e-9])
    assert rank_of(dw) == 3 and rank_of(dw, rtol=1e-6) == 2


def test_singular_value_counts_mean_over_layers():
    deltas = {
        "layers.0.self_attn.q_proj.weight": with_singular_values(16, 16, [1.0] * 3 + [0.05] * 2, seed=0),
        "layers.1.self_attn.q_proj.weight": with_singular_values(16, 16, [1.0] * 6, seed=1),
        "layers.0.mlp.down_proj.weight": with_singular_values(16, 24, [0.5] * 8, seed=2),
    }
    counts = singular_value_counts(deltas)
    assert counts == {"q_proj": 4.5, "down_proj": 8.0}
    assert list(counts) == ["q_proj", "down_proj"]  # in the q, k, v, o, gate, up, down order
    assert singular_value_counts(deltas, threshold=0.6) == {"q_proj": 4.5, "down_proj": 0.0}
    with pytest.raises(ValueError, match="lm_head"):
        singular_value_counts({"lm_head.weight": torch.ones(2, 2)})
