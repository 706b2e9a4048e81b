"""To and from a Hugging Face LlamaForCausalLM folder, without needing `transformers` installed.

    save_hf(model, model_cfg, out_dir, tokenizer_path)  # config.json, model.safetensors, tokenizer files
    model_cfg, model = load_hf(out_dir)                   # back to our Llama, for round trips

Our module names are Hugging Face's minus the `model.` prefix (see megamora/model.py), so the
conversion is a rename. config.json carries both spellings of the rotary base (`rope_theta` for
transformers 4.x, `rope_parameters` for 5.x). The t5-base tokenizer has no BOS token; EOS is 1 and
PAD is 0, which is what the defaults below write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megamora.adapters import iter_adapters
from megamora.config import ModelConfig
from megamora.model import Llama, build_model

T5_EOS_ID, T5_PAD_ID = 1, 0
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
_PREFIX = "model."


# --------------------------------------------------------------------------- safetensors


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically (a temp file in the same folder, then a rename).

    Tensors sharing storage (tied weights) are written as separate copies: safetensors refuses
    aliases, and a reader expects every key of the state dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        save_file(out, str(tmp), metadata={"format": "pt", **(metadata or {})})
        os.chmod(tmp, 0o644)  # safetensors creates the file owner-only
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A plain model's state dict in `dtype` (what tools/merge_checkpoint.py writes)."""
    return {k: v.detach().to(dtype) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- config


def hf_config(cfg: ModelConfig, *, max_position_embeddings: int = 2048, eos_token_id: int = T5_EOS_ID,
              pad_token_id: int = T5_PAD_ID, bos_token_id: int | None = None,
              torch_dtype: str = "float32") -> dict:
    """config.json of a LlamaForCausalLM with our model's shapes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "torch_dtype": torch_dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
    }


def model_config_from_hf(config: dict) -> ModelConfig:
    """Our ModelConfig from a Llama config.json; raises ValueError for what our Llama cannot express."""
    arch = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"config.json describes {config.get('model_type')!r} / {arch}, not a LlamaForCausalLM")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(config.get("attention_bias", False)), False),
        "mlp_bias": (bool(config.get("mlp_bias", False)), False),
        "rope type": (rope_type, "default"),
    }
    for key, (value, want) in checks.items():
        if value != want:
            raise ValueError(f"config.json {key}={value!r} is not supported (only {want!r})")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"config.json head_dim={config['head_dim']} is not hidden_size / num_attention_heads")
    n_kv = config.get("num_key_value_heads") or n_heads
    return ModelConfig(
        dim=dim,
        ffn_dim=config["intermediate_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02),
    )


# --------------------------------------------------------------------------- weights


def to_hf_names(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our names -> LlamaForCausalLM's: `model.` before everything but `lm_head` (dropped when tied)."""
    out = {}
    for key, t in state.items():
        if key.startswith("lm_head."):
            if not tied:
                out[key] = t
        else:
            out[_PREFIX + key] = t
    return out


def from_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(_PREFIX): v for k, v in state.items()}


def _check_plain(model: nn.Module) -> None:
    name = next((n for n, _ in iter_adapters(model)), None)
    if name is not None:
        raise ValueError(f"model still has an adapter at {name!r}: merge_adapters() it first")


# --------------------------------------------------------------------------- tokenizer


def _is_hub_name(name: str) -> bool:
    # "t5-base" or "org/name"; anything else (a file name, a deeper or absolute path) is a local path.
    return not (name.endswith((".model", ".json")) or name.startswith(("/", ".", "~")) or name.count("/") > 1)


def local_tokenizer_files(tokenizer: str | Path) -> list[Path]:
    """The tokenizer files to ship beside the weights: the given spiece.model / tokenizer.json and
    its sibling of the other kind, or what a tokenizer folder holds; [] for a Hub name. Raises
    FileNotFoundError for a local path that does not exist."""
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        folder = path
    elif path.is_file():
        folder = path.parent
    elif _is_hub_name(str(tokenizer)):
        return []
    else:
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    found = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if path.is_file() and path not in found:  # a file under another name (e.g. t5.model)
        found.insert(0, path)
    if not found:
        raise FileNotFoundError(f"tokenizer folder {tokenizer} holds none of {list(TOKENIZER_FILES)}")
    return found


def _tokenizer_config(model_max_length: int) -> dict:
    # The project's tokenizer is t5-base: T5Tokenizer reads either file and appends EOS, as training did.
    return {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": 100,
        "model_max_length": model_max_length,
    }


# --------------------------------------------------------------------------- folder


def save_hf(model: nn.Module, model_cfg: ModelConfig, out_dir: str | Path, tokenizer_path: str | Path | None = None,
            *, max_position_embeddings: int = 2048, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write a LlamaForCausalLM folder for a plain (merged) Llama: config.json, model.safetensors and,
    when `tokenizer_path` is a local file or folder, its tokenizer files (spiece.model and/or
    tokenizer.json) with a tokenizer_config.json. Returns the files written."""
    _check_plain(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    written = [out / CONFIG_FILE]
    (out / CONFIG_FILE).write_text(json.dumps(
        hf_config(model_cfg, max_position_embeddings=max_position_embeddings, torch_dtype=dtype_name), indent=2) + "\n")
    weights = to_hf_names(merged_state_dict(model, dtype), model_cfg.tie_embeddings)
    written.append(save_safetensors(weights, out / WEIGHTS_FILE))
    files = local_tokenizer_files(tokenizer_path) if tokenizer_path is not None else []
    for f in files:
        target = out / ("tokenizer.json" if f.suffix == ".json" else "spiece.model")
        if target not in written:  # the given file wins over a sibling of the same kind
            shutil.copyfile(f, target)
            written.append(target)
    if files:
        config = _tokenizer_config(max_position_embeddings)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append(out / "tokenizer_config.json")
    return written


def load_hf(path: str | Path, device: str | torch.device = "cpu") -> tuple[ModelConfig, Llama]:
    """Our Llama from a LlamaForCausalLM folder (config.json + model.safetensors)."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder: no {name}")
    cfg = model_config_from_hf(json.loads((path / CONFIG_FILE).read_text()))
    state = from_hf_names(load_file(str(path / WEIGHTS_FILE), device=str(device)))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = build_model(cfg, device="meta")
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives every module its own tensor: tie again
        model.lm_head.weight = model.embed_tokens.weight
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match config.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return cfg, model
