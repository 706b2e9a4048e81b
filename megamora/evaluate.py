"""Perplexity: exp of the token-weighted mean cross-entropy, summed over all ranks before dividing;
the trainer's loop (evaluate_loss), and the same of a run directory or a Hugging Face folder.

    evaluate_run(run_dir)                             # the merged model, as the run's final eval
    evaluate_hf_folder(hf_dir, data_overrides=[...])  # the same for a LlamaForCausalLM folder
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megamora.checkpoint import read_trainer_state
from megamora.config import TrainConfig, load_config
from megamora.data import validation_batches
from megamora.distributed import all_reduce_sum, process_group_active
from megamora.export import find_checkpoint, load_merged_model, run_config
from megamora.hf import TOKENIZER_FILES, HFFolder, is_hf_folder, load_hf, read_hf_folder
from megamora.tokenizer import load_tokenizer


@torch.no_grad()
def evaluate_loss(model: nn.Module, sequences: torch.Tensor, micro_batch_size: int,
                  device: torch.device) -> tuple[float, int]:
    """Mean next-token cross-entropy and the number of target tokens over every rank's `sequences`
    (n, seq_len + 1): this rank's share (megamora.data.validation_share). Collective under a process
    group: every rank runs as many forward passes as the rank with the most batches (FSDP gathers
    are collective), a rank that has run out forwarding a dummy batch whose loss is not counted."""
    rounds = _most_over_ranks(-(-sequences.shape[0] // micro_batch_size), device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: one read at the end
    count = 0
    for i in range(rounds):
        batch = sequences[i * micro_batch_size : (i + 1) * micro_batch_size].to(device)
        if batch.shape[0] == 0:  # nothing left here; keep in step with the other ranks
            model(torch.zeros(1, sequences.shape[1] - 1, dtype=torch.long, device=device))
            continue
        loss_sum += model(batch[:, :-1], targets=batch[:, 1:], reduction="sum").double()
        count += batch[:, 1:].numel()
    model.train(was_training)
    loss_sum, count = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(count)]), device)
    if count == 0:
        raise ValueError("no validation sequence to evaluate")
    return loss_sum / count, int(count)


def _most_over_ranks(value: int, device: torch.device) -> int:
    if not process_group_active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss)


# --------------------------------------------------------------------------- a run directory or a Hugging Face folder


def eval_device(name: str = "auto") -> torch.device:
    """Where the tools evaluate: `auto` is the GPU when there is one, else the CPU; otherwise a torch
    device name (cpu, cuda, cuda:1). Not distributed.pick_device, which places a rank of a run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def config_with_data_overrides(run_dir: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The run's config with `data.key=value` overrides (e.g. where the validation files lie on this
    machine). Other sections describe the trained model and cannot be overridden here."""
    _check_data_overrides(overrides)
    run_config(run_dir)
    return load_config(Path(run_dir) / "config.yaml", list(overrides))


def _check_data_overrides(overrides: Sequence[str]) -> None:
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ValueError(f"only data.* overrides are allowed here, got {bad[0]!r}")


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} is not one of ['float32', 'bfloat16']")


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise ValueError(f"micro_batch_size={batch} must be positive")


def _validation(cfg: TrainConfig, num_tokens: int, tokenizer=None) -> tuple[torch.Tensor, bool]:
    """The validation sequences and whether the split is shorter than asked. A short split is
    evaluated whole and flagged, as the trainer does (a run's own short final eval is reproduced)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    sequences = validation_batches(cfg.data, tokenizer, num_tokens, at_most=True)
    return sequences, sequences.shape[0] < max(1, num_tokens // cfg.data.seq_len)


def _perplexity_of(model: nn.Module, sequences: torch.Tensor, batch: int, device: str | torch.device,
                   dtype: str) -> dict:
    device = torch.device(device)
    model.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss, count = evaluate_loss(model, sequences, batch, device)
    return {"perplexity": perplexity(loss), "loss": loss, "tokens": count}


@torch.no_grad()
def evaluate_run(run_dir: str | Path, checkpoint: str | Path | None = None, tokens: Optional[int] = None,
                 micro_batch_size: Optional[int] = None, data_overrides: Sequence[str] = (),
                 device: str | torch.device = "cpu", dtype: str = "float32") -> dict:
    """C4 validation perplexity (exp of the token-weighted mean cross-entropy) of the merged model.

    Defaults reproduce the run's own final eval: the same first `final_eval_tokens` (else
    `eval_tokens`) validation tokens, packed the same way. `dtype` bfloat16 evaluates under autocast,
    as a bf16 run's trainer does; the default is fp32. `run_dir` may also be a Hugging Face
    LlamaForCausalLM folder (evaluate_hf_folder)."""
    _check_dtype(dtype)
    if is_hf_folder(run_dir):
        if checkpoint is not None:
            raise ValueError(f"{run_dir} is a Hugging Face model folder: it has no checkpoints to choose from")
        return evaluate_hf_folder(run_dir, tokens, micro_batch_size, data_overrides, device, dtype)
    cfg = config_with_data_overrides(run_dir, data_overrides)
    ckpt = find_checkpoint(run_dir, checkpoint)
    num_tokens = tokens if tokens is not None else (cfg.final_eval_tokens or cfg.eval_tokens)
    batch = micro_batch_size if micro_batch_size is not None else cfg.micro_batch_size
    _check_batch(batch)
    sequences, short = _validation(cfg, num_tokens)  # data problems surface before the model is loaded
    _, model = load_merged_model(run_dir, ckpt)
    return {**_perplexity_of(model, sequences, batch, device, dtype), "tokens_requested": num_tokens,
            **({"validation_short": True} if short else {}), "checkpoint": str(ckpt),
            "step": read_trainer_state(ckpt)["step"]}


def hf_folder_config(folder: HFFolder, data_overrides: Sequence[str] = ()) -> TrainConfig:
    """The settings a Hugging Face folder is evaluated with, having no run config: the defaults with
    `data.key=value` overrides; unless overridden, the folder's own tokenizer files and the default
    seq_len capped by the model's max_position_embeddings. Raises a one-line ValueError for a folder
    without tokenizer files (give data.tokenizer=) or a tokenizer larger than the model's vocabulary."""
    _check_data_overrides(data_overrides)
    given = {o.split("=", 1)[0].strip() for o in data_overrides}
    cfg = load_config(None, [f"run_dir={folder.path}", *data_overrides])
    if "data.seq_len" not in given and folder.max_position_embeddings:
        cfg.data.seq_len = min(cfg.data.seq_len, folder.max_position_embeddings)
    if "data.tokenizer" not in given:
        if not any((folder.path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"{folder.path} holds no tokenizer file ({' / '.join(TOKENIZER_FILES)}): "
                             "give one with data.tokenizer=PATH")
        cfg.data.tokenizer = str(folder.path)  # load_tokenizer's folder rule: tokenizer.json, else spiece.model
    return cfg


@torch.no_grad()
def evaluate_hf_folder(path: str | Path, tokens: Optional[int] = None, micro_batch_size: Optional[int] = None,
                       data_overrides: Sequence[str] = (), device: str | torch.device = "cpu",
                       dtype: str = "float32") -> dict:
    """evaluate_run for a Hugging Face LlamaForCausalLM folder (exported by tools/convert_to_hf.py or
    from elsewhere), on the validation tokens a run with the same data settings evaluates (see
    hf_folder_config; default tokens: a run's default eval_tokens). Weights are loaded in fp32
    whatever their stored dtype. Same keys as evaluate_run, with the folder as checkpoint and no step."""
    _check_dtype(dtype)
    folder = read_hf_folder(path)  # config and weight headers: no weight read yet
    cfg = hf_folder_config(folder, data_overrides)
    num_tokens = tokens if tokens is not None else (cfg.final_eval_tokens or cfg.eval_tokens)
    batch = micro_batch_size if micro_batch_size is not None else cfg.micro_batch_size
    _check_batch(batch)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > folder.model_cfg.vocab_size:
        raise ValueError(f"tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens, more than the "
                         f"vocab_size={folder.model_cfg.vocab_size} of {folder.path / 'config.json'}")
    sequences, short = _validation(cfg, num_tokens, tokenizer)
    _, model = load_hf(folder.path, dtype=torch.float32)
    return {**_perplexity_of(model, sequences, batch, device, dtype), "tokens_requested": num_tokens,
            **({"validation_short": True} if short else {}), "checkpoint": str(folder.path), "step": None}
