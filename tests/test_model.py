
import pytest
import torch

from megamora.config import MODEL_PRESETS, ModelConfig, load_config
from megamora.model import RMSNorm, apply_rotary, build_model, count_parameters, init_weights, rotary_cos_sin


def tiny_config(**kw) -> ModelConfig:
    base = dict(dim=32, ffn_dim=64, n_layers=2, n_heads=4, vocab_size=97)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw):
    model = build_model(tiny_config(**kw), device="cpu")
    init_weights(model, seed, 0.02)
    return model


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 97, (2, 5))
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rotary_matches_complex_rotation_formula():
    torch.manual_seed(0)
    seq, hd, theta = 9, 8, 10000.0
    x = torch.randn(1, 2, seq, hd)
    cos, sin = rotary_cos_sin(seq, hd, theta, "cpu")
    got = apply_rotary(x, cos, sin)
    # rotate-half layout: dims (i, i + hd/2) form the complex pair rotated by m * theta^(-2i/hd)
    half = hd // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    m = torch.arange(seq, dtype=torch.float64)[:, None]
    freqs = theta ** (-2 * torch.arange(half, dtype=torch.float64) / hd)
    rotated = z * torch.polar(torch.ones(seq, half, dtype=torch.float64), m * freqs)
    want = torch.cat([rotated.real, rotated.imag], dim=-1).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_formula_and_computes_in_fp32():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16) * 100
    want = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), want)
    xb = x.bfloat16()
    ref = (xb.float() / torch.sqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(norm(xb), norm.weight * ref)


@pytest.mark.parametrize("preset,expected", [("250m", 247.5e6), ("1b", 1.339e9)])
def test_preset_parameter_counts(preset, expected):
    cfg = load_config(None, ["run_dir=x", f"model.preset={preset}"]).model
    assert (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads) == MODEL_PRESETS[preset]
    n = count_parameters(build_model(cfg, device="meta"))
    assert abs(n - expected) / expected < 0.002, n


def test_init_is_seeded_per_parameter_and_hf_style():
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc), name
            assert abs(pa.std().item() - 0.02) < 0.005, name
    # two weights of the same shape get different values
    assert not torch.equal(a.layers[0].self_attn.q_proj.weight, a.layers[0].self_attn.k_proj.weight)


def test_grouped_query_attention_and_untied_head():
    model = tiny_model(n_kv_heads=2)
    assert model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert model(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_matches_hugging_face_llama(n_kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(n_kv_heads=n_kv_heads)
    ours = tiny_model(n_kv_heads=n_kv_heads)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=n_kv_heads or cfg.n_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict({("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
                                              for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_stay_tied_after_meta_materialization():
    from megamora.model import materialize

    model = build_model(tiny_config(tie_embeddings=True), device="meta")
    materialize(model, torch.device("cpu"), 0, 0.02)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert count_parameters(model) == count_parameters(tiny_model()) - 97 * 32
