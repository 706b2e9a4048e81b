"""To and from a Hugging Face LlamaForCausalLM folder, without needing `transformers` installed.

    save_hf(model, model_cfg, out_dir, tokenizer_path)  # config.json, model.safetensors, tokenizer files
    model_cfg, model = load_hf(out_dir)                   # back to our Llama (ours or a third party's)
    folder = read_hf_folder(path)                         # checks only: config.json + safetensors headers

A folder from elsewhere is checked before any weight is read: an architecture or option our Llama
cannot express, missing or extra weights, shapes other than config.json's, and pickled weights
(`pytorch_model.bin`: loading one can run code) each fail as a one-line ValueError naming the folder.

Our module names are Hugging Face's minus the `model.` prefix (see megamora/model.py), so the
conversion is a rename. config.json carries both spellings of the rotary base (`rope_theta` for
transformers 4.x, `rope_parameters` for 5.x). The t5-base tokenizer has no BOS token; EOS is 1 and
PAD is 0, which is what the defaults below write.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from megamora.adapters import base_parameters, iter_adapters
from megamora.config import ModelConfig
from megamora.engines.tensors import set_full_
from megamora.model import Llama, build_model

T5_EOS_ID, T5_PAD_ID = 1, 0
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint: tensor name -> file
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # torch.save archives: never loaded
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' dtype names
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
    # Either spelling may carry a rope scaling (transformers 4.x: rope_scaling; 5.x: rope_parameters).
    ropes = [r for r in (config.get("rope_parameters"), config.get("rope_scaling")) if r]
    rope_types = [r.get("rope_type", r.get("type", "default")) if isinstance(r, dict) else r for r in ropes]
    checks = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(config.get("attention_bias", False)), False),
        "mlp_bias": (bool(config.get("mlp_bias", False)), False),
        "rope type": (next((t for t in rope_types if t != "default"), "default"), "default"),
    }
    for key, (value, want) in checks.items():
        if value != want:
            raise ValueError(f"config.json {key}={value!r} is not supported (only {want!r})")
    shape = {}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.json {key}={value!r} is not a positive integer")
        shape[key] = value
    dim, n_heads = shape["hidden_size"], shape["num_attention_heads"]
    if dim % n_heads or (dim // n_heads) % 2:
        raise ValueError(f"config.json hidden_size={dim} / num_attention_heads={n_heads} is not an even head size")
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"config.json head_dim={config['head_dim']} is not hidden_size / num_attention_heads")
    n_kv = config.get("num_key_value_heads") or n_heads
    if not isinstance(n_kv, int) or n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"config.json num_key_value_heads={n_kv!r} does not divide num_attention_heads={n_heads}")
    rope = ropes[0] if ropes and isinstance(ropes[0], dict) else {}
    return ModelConfig(
        dim=dim,
        ffn_dim=shape["intermediate_size"],
        n_layers=shape["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        vocab_size=shape["vocab_size"],
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
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


@dataclass
class HFFolder:
    """A checked LlamaForCausalLM folder: its config and weight files, none of the weights read yet."""

    path: Path
    model_cfg: ModelConfig
    config: dict  # config.json as written
    files: list[Path]  # safetensors files holding the weights
    dtype: torch.dtype  # of the stored weights (of the first tensor, as written by save_hf)

    @property
    def max_position_embeddings(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return value if isinstance(value, int) and value > 0 else None


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` stands for a Hugging Face model folder: a config.json, and neither a run
    directory's config.yaml nor a checkpoint's trainer_state.json. Deliberately loose: what the
    folder holds is read_hf_folder's to check, so that a GPT-2 or .bin-only folder fails naming why
    rather than as "not a run directory"."""
    path = Path(path)
    return ((path / CONFIG_FILE).is_file() and not (path / "config.yaml").exists()
            and not (path / "trainer_state.json").exists())


def _weight_files(path: Path) -> list[Path]:
    index = path / WEIGHTS_INDEX
    if index.is_file():  # sharded: every file the index names must be there
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: cannot read its weight_map ({type(e).__name__}: {e})") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{path}: {missing[0]} (named by {WEIGHTS_INDEX}) is missing: an incomplete download?")
        return [path / n for n in names]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{path} holds {pickles[0]} but no {WEIGHTS_FILE}: only safetensors weights are loaded "
                         "(a pickled checkpoint can run code when loaded); save the model with "
                         "safe_serialization=True first")
    raise ValueError(f"{path} holds no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX})")


def _ignored(name: str) -> bool:
    # Old transformers versions saved the rotary frequencies, which our Llama recomputes.
    return name.endswith("rotary_emb.inv_freq")


def read_hf_folder(path: str | Path) -> HFFolder:
    """Check a LlamaForCausalLM folder without loading a weight: config.json describes a model our
    Llama expresses, and the safetensors headers hold exactly its weights at its shapes. Raises a
    one-line ValueError (FileNotFoundError for no config.json) naming the folder and the cause."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: no {CONFIG_FILE}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{path / CONFIG_FILE}: cannot read it ({e})") from None
    try:
        cfg = model_config_from_hf(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    files = _weight_files(path)
    expected = {k: list(v.shape) for k, v in to_hf_names(build_model(cfg, device="meta").state_dict(),
                                                          cfg.tie_embeddings).items()}
    found: dict[str, tuple[list[int], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    found[key] = (sl.get_shape(), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: cannot read it ({str(e).strip()})") from None
    if cfg.tie_embeddings:  # some writers keep the tied head too; it is the embedding
        found.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not _ignored(k)]
    if missing:
        raise ValueError(f"{path}: {len(missing)} weights of config.json's model are missing ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): an incomplete download or another model")
    if unexpected:
        raise ValueError(f"{path}: weights our Llama has no place for ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
    for key, shape in expected.items():
        if found[key][0] != shape:
            raise ValueError(f"{path}: {key} has shape {found[key][0]} but config.json implies {shape}")
    dtypes = {found[k][1] for k in expected}
    if not dtypes <= FLOAT_DTYPES:
        raise ValueError(f"{path}: weights of dtype {sorted(dtypes - FLOAT_DTYPES)[0]} are not supported "
                         f"(only {sorted(FLOAT_DTYPES)}; quantized models are not)")
    first = next(iter(expected))
    dtype = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[found[first][1]]
    return HFFolder(path, cfg, config, files, dtype)


def model_differences(folder: ModelConfig, run: ModelConfig) -> dict[str, tuple]:
    """model.<key> -> (folder's value, run's value) for each setting the weights depend on (shapes,
    tying) or the function they compute (norm eps, rotary base) that differs."""
    def settings(c: ModelConfig) -> dict:
        return {"dim": c.dim, "ffn_dim": c.ffn_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads or c.n_heads, "vocab_size": c.vocab_size,
                "tie_embeddings": c.tie_embeddings, "norm_eps": float(c.norm_eps), "rope_theta": float(c.rope_theta)}

    a, b = settings(folder), settings(run)
    return {f"model.{k}": (a[k], b[k]) for k in a if a[k] != b[k]}


@torch.no_grad()
def load_hf_weights(folder: HFFolder, model: Llama) -> None:
    """Copy a checked folder's weights into `model` of the same shapes (cast to its dtype), one
    safetensors file at a time: a plain model, or one whose layers adapters wrap (`q_proj.base.weight`
    takes `q_proj.weight`; the adapters keep their values), sharded or not. No full copy of the model
    is made beside it."""
    differ = model_differences(folder.model_cfg, model.cfg)
    if differ:
        what = "; ".join(f"{k}={a} in the folder vs {b}" for k, (a, b) in differ.items())
        raise ValueError(f"{folder.path}: another model than this one: {what}")
    targets = base_parameters(model)
    loaded: set[str] = set()
    for f in folder.files:
        for name, value in from_hf_names(load_file(str(f))).items():
            if name in targets:  # keys and shapes were checked by read_hf_folder; lm_head may be tied
                set_full_(targets[name], value)
                loaded.add(name)
    left = sorted(set(targets) - loaded)
    if left:  # the headers said otherwise: the files changed under us
        raise ValueError(f"{folder.path}: no weights loaded for {left[:3]}")


def load_hf(path: str | Path, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> tuple[ModelConfig, Llama]:
    """Our Llama from a LlamaForCausalLM folder (config.json + model.safetensors, or shards with an
    index), in `dtype` (default: the stored one). Raises the one-line errors of read_hf_folder."""
    folder = read_hf_folder(path)
    model = build_model(folder.model_cfg, device="meta")
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives every module its own tensor: tie again
    model.to(dtype or folder.dtype)
    load_hf_weights(folder, model)
    return folder.model_cfg, model
