"""A from-scratch LLaMA: RMSNorm, rotary embeddings (Hugging Face rotate-half layout), SwiGLU.

Module and parameter names follow Hugging Face's LlamaForCausalLM (minus its `model.` prefix), so
checkpoints convert by renaming nothing. The model is meant to be built on the meta device, have
adapters swapped in, be sharded, and only then be given values by `init_weights`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamora.config import ModelConfig
from megamora.engines.tensors import InitFn, seeded_fill_
from megamora.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    param_init: dict[str, InitFn] = {"weight": lambda t, g: t.fill_(1.0)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF Llama does, then cast back before the scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim) in fp32, frequencies repeated as in HF (rotate-half)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotation computed in fp32."""
    out = x.float() * cos + rotate_half(x.float()) * sin
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        self.activation_checkpointing = False

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)


class OutputHead(nn.Linear):
    """The output layer. Given targets it returns the fp32 cross-entropy instead of the logits,
    computed `chunk_size` tokens at a time (megamora.loss; 0: from the full logits). The loss is
    computed inside this module's forward so that engines that gather a module's weights around its
    own forward (DeepSpeed ZeRO-3) see the weight in use."""

    chunk_size: int = 1024

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        if targets is None:
            return super().forward(h)
        return linear_cross_entropy(h.flatten(0, -2), self.weight, targets.flatten(), self.chunk_size, reduction)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = OutputHead(cfg.dim, cfg.vocab_size, bias=False)
        self._rotary: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the input embedding with the output head if configured (again after `to_empty`,
        which gives every parameter new storage)."""
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.embed_tokens.weight:
            self.lm_head.weight = self.embed_tokens.weight

    def rotary(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos/sin tables, built once per (length, device) rather than every forward."""
        key = (seq_len, device)
        if key not in self._rotary:
            self._rotary[key] = rotary_cos_sin(seq_len, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, device)
        return self._rotary[key]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab); with targets (batch, seq) the fp32 mean
        (or summed) next-token cross-entropy instead, without materialising the logits."""
        h = self.embed_tokens(tokens)
        cos, sin = self.rotary(tokens.shape[1], tokens.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.norm(h), targets, reduction)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())


# ---------------------------------------------------------------------------------------------
# Initialisation: every parameter is drawn in full from a generator seeded by (seed, its name), so
# the weights are identical for any world size and any sharding, and independent of module order
# (seeded_fill_ in megamora.engines.tensors).


def normal_init(std: float) -> InitFn:
    return lambda t, g: t.normal_(0.0, std, generator=g)


def init_weights(model: nn.Module, seed: int, std: float = 0.02, draw: bool = True) -> None:
    """Give every parameter and buffer its initial value (after `to_empty` on a meta model).

    A module may declare `param_init = {name: fn(tensor, generator)}`; anything else (Linear and
    Embedding weights) is normal(0, std) as in Hugging Face. Modules with non-persistent buffers
    recompute them in `init_buffers()`. Wrapped base layers (`.base.`) are seeded under the name
    they have in the plain model, so adapted and full-rank runs start from the same weights.
    draw=False computes the buffers only: for a resume, whose checkpoint overwrites every parameter.
    """
    done: set[int] = set()
    for mod_name, module in model.named_modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
        if not draw:
            continue
        rules = getattr(module, "param_init", {})
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in done:  # tied weights
                continue
            done.add(id(param))
            key = f"{mod_name}.{p_name}".replace(".base.", ".")
            seeded_fill_(param, rules.get(p_name, normal_init(std)), seed, key, owner=len(done))
    if draw:  # values derived from other parameters' (an adapter's that follow its base weight)
        for module in model.modules():
            if hasattr(module, "init_from_base"):
                module.init_from_base()


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> Llama:
    with torch.device(device):
        return Llama(cfg)


def materialize(model: Llama, device: torch.device, seed: int, std: float, draw: bool = True) -> None:
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model, seed, std, draw)


def kaiming_uniform_init(t: torch.Tensor, g: torch.Generator) -> None:
    """nn.Linear's default (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(t.shape[1])
    t.uniform_(-bound, bound, generator=g)


def zeros_init(t: torch.Tensor, g: torch.Generator) -> None:
    t.zero_()


def initial_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The exact initial weights of a run with this model config and seed (plain-model names):
    W_init for dW = W_final - W_init, without having stored it."""
    model = build_model(cfg, device="cpu")
    init_weights(model, seed, cfg.init_std)
    return model.state_dict()
