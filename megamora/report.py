"""Results of run directories: C4 perplexity (Table 3) and the spectrum of dW (Figure 5).

    evaluate_run(run_dir)                  # perplexity of the merged model, as the run's final eval
    evaluate_hf_folder(hf_dir, data_overrides=[...])  # the same for a LlamaForCausalLM folder
    run_singular_value_counts(run_dir)     # Figure 5 numbers of one run
    summaries = [summarize_run(name, run_dir) for ...]
    write_report(summaries, out_dir)       # report.md (Table 3 + Figure 5 tables), figure5.png, results.json

The tools in tools/ are thin command lines over these functions.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megamora.analysis import delta_weights, module_type, singular_value_counts
from megamora.checkpoint import latest_checkpoint, read_trainer_state, resolve_checkpoint
from megamora.config import MODEL_PRESETS, ModelConfig, TrainConfig, load_config
from megamora.data import validation_batches
from megamora.evaluate import evaluate_loss, perplexity
from megamora.export import initial_weights, load_merged_model, run_config
from megamora.hf import TOKENIZER_FILES, HFFolder, is_hf_folder, load_hf, read_hf_folder
from megamora.metrics import read_metrics
from megamora.tokenizer import load_tokenizer

# Paper Table 3: C4 validation perplexity after 10k steps, by model preset and method.
PAPER_TABLE3: dict[str, dict[str, float]] = {
    "250m": {"LoRA": 33.40, "MoRA": 28.54, "ReLoRA": 32.19, "ReMoRA": 26.74},
    "1b": {"LoRA": 28.56, "MoRA": 25.25, "ReLoRA": 27.80, "ReMoRA": 23.34},
}
PRESET_LABELS = {"250m": "250M", "1b": "1.3B"}
# Figure 5's order of module types, and the labels under its bar groups.
FIGURE5_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- one run


def method_of(cfg: TrainConfig) -> str:
    """The Table 3 row of a run: LoRA, MoRA, ReLoRA, ReMoRA (or Full-rank)."""
    if cfg.adapter.kind == "none":
        return "Full-rank"
    name = {"lora": "LoRA", "mora": "MoRA"}[cfg.adapter.kind]
    return f"Re{name}" if cfg.restarts.every else name


# Words of a run label that name a method; the rest of a label is free text.
_METHOD_WORDS = {"lora": "LoRA", "mora": "MoRA", "relora": "ReLoRA", "remora": "ReMoRA", "full": "Full-rank",
                 "fullrank": "Full-rank"}


def label_note(name: str, method: str) -> Optional[str]:
    """A note when the label a user gave a run names another method than the run's config.yaml.
    The report's method column always follows config.yaml (`method_of`); the label is kept as typed."""
    named = {_METHOD_WORDS[w] for w in re.split(r"[^a-z0-9]+", name.lower()) if w in _METHOD_WORDS}
    if not named or method in named:
        return None
    return (f"run {name!r} is labelled {' / '.join(sorted(named))} but its config.yaml says {method}: "
            f"the method column follows config.yaml")


def _records(run_dir: str | Path, kind: str) -> list[dict]:
    """read_metrics, with a damaged metrics.jsonl (e.g. a line cut short by a crash) named in one line."""
    try:
        return read_metrics(run_dir, kind)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: cannot read ({type(e).__name__}: {e})") from None


def check_logged_adapter(run_dir: str | Path, cfg: TrainConfig) -> None:
    """config.yaml must be the config of the run that logged metrics.jsonl (whose setup records name
    the adapter kind): a config.yaml of another run would make the report name the wrong method."""
    path = Path(run_dir) / "metrics.jsonl"
    records = _records(run_dir, "setup") if path.is_file() else []
    logged = {r.get("adapter_kind") for r in records} - {None}
    if logged and logged != {cfg.adapter.kind}:
        raise ValueError(f"{Path(run_dir) / 'config.yaml'} says adapter.kind={cfg.adapter.kind} but {path} was "
                         f"logged by a {' / '.join(sorted(logged))} run: the run directory is inconsistent")


def preset_of(cfg: ModelConfig) -> Optional[str]:
    """The model preset a run used, also when its shapes were given field by field."""
    if cfg.preset:
        return cfg.preset
    shape = (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads)
    return next((name for name, s in MODEL_PRESETS.items() if s == shape), None)


def paper_perplexity(method: str, preset: Optional[str]) -> Optional[float]:
    return PAPER_TABLE3.get(preset or "", {}).get(method)


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """`checkpoint` as given (a checkpoint folder, a run folder, or a name under run_dir/checkpoints),
    or the newest checkpoint of the run. Raises FileNotFoundError naming what is missing."""
    run_config(run_dir)  # "not a run directory" comes first
    if checkpoint is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
        return found
    path = Path(checkpoint)
    if not path.exists() and (Path(run_dir) / "checkpoints" / path).exists():
        path = Path(run_dir) / "checkpoints" / path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    return resolve_checkpoint(path)


def config_with_data_overrides(run_dir: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The run's config with `data.key=value` overrides (e.g. where the validation files lie on this
    machine). Other sections describe the trained model and cannot be overridden here."""
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ValueError(f"only data.* overrides are allowed here, got {bad[0]!r}")
    run_config(run_dir)
    return load_config(Path(run_dir) / "config.yaml", list(overrides))


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


def _perplexity_of(model: torch.nn.Module, sequences: torch.Tensor, batch: int, device: str | torch.device,
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
    bad = [o for o in data_overrides if not o.startswith("data.")]
    if bad:
        raise ValueError(f"only data.* overrides are allowed here, got {bad[0]!r}")
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


@torch.no_grad()
def run_singular_value_counts(run_dir: str | Path, checkpoint: str | Path | None = None, threshold: float = 0.1,
                              device: str | torch.device = "cpu") -> dict[str, float]:
    """Figure 5 for one run: per module type, the mean over layers of the number of singular values
    above `threshold` of dW = W_final (adapters merged) - W_init, in fp32."""
    ckpt = find_checkpoint(run_dir, checkpoint)
    _, model = load_merged_model(run_dir, ckpt)
    current = {k: v.to(device) for k, v in model.state_dict().items() if module_type(k)}
    deltas = delta_weights(initial_weights(run_dir), current)
    return singular_value_counts(deltas, threshold)


def final_eval_record(run_dir: str | Path) -> dict:
    """The run's last eval record (the highest step; of a step logged twice, as after a resume, the later)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl")
    records = _records(run_dir, "eval")
    if not records:
        raise ValueError(f"{path} has no eval record (recompute it with --eval)")
    last = max(r["step"] for r in records)
    return [r for r in records if r["step"] == last][-1]


# --------------------------------------------------------------------------- several runs


@dataclass
class RunSummary:
    name: str
    run_dir: str
    method: str
    preset: Optional[str]
    step: int
    perplexity: float
    tokens: int
    perplexity_source: str  # "metrics" (the run's own final eval) or "recomputed"
    paper_perplexity: Optional[float]
    sv_counts: Optional[dict[str, float]] = None


def summarize_run(name: str, run_dir: str | Path, *, recompute_eval: bool = False, counts: bool = True,
                  threshold: float = 0.1, data_overrides: Sequence[str] = (), eval_tokens: Optional[int] = None,
                  device: str | torch.device = "cpu") -> RunSummary:
    cfg = run_config(run_dir)
    check_logged_adapter(run_dir, cfg)
    if recompute_eval:
        ev = evaluate_run(run_dir, tokens=eval_tokens, data_overrides=data_overrides, device=device)
    else:
        ev = final_eval_record(run_dir)
    method, preset = method_of(cfg), preset_of(cfg.model)
    return RunSummary(
        name=name, run_dir=str(run_dir), method=method, preset=preset, step=int(ev["step"]),
        perplexity=float(ev["perplexity"]), tokens=int(ev["tokens"]),
        perplexity_source="recomputed" if recompute_eval else "metrics",
        paper_perplexity=paper_perplexity(method, preset),
        sv_counts=run_singular_value_counts(run_dir, threshold=threshold, device=device) if counts else None,
    )


def _cell(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return "" if value is None else fmt.format(value)


def table3_markdown(summaries: Sequence[RunSummary]) -> str:
    """Table 3 as markdown: our C4 perplexity beside the paper's for the same method and model size."""
    lines = ["| run | method | model | step | eval tokens | C4 perplexity | paper (Table 3) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s in summaries:
        model = PRESET_LABELS.get(s.preset or "", s.preset or "custom")
        lines.append(f"| {s.name} | {s.method} | {model} | {s.step} | {s.tokens} | {_cell(s.perplexity)} "
                     f"| {_cell(s.paper_perplexity)} |")
    return "\n".join(lines) + "\n"


def figure5_markdown(summaries: Sequence[RunSummary]) -> str:
    """Figure 5's numbers as a table: one row per module type, one column per run."""
    runs = [s for s in summaries if s.sv_counts is not None]
    lines = ["| module | " + " | ".join(s.name for s in runs) + " |", "|---|" + "---:|" * len(runs)]
    for kind in FIGURE5_MODULES:
        cells = " | ".join(_cell(s.sv_counts.get(kind), "{:.1f}") for s in runs)
        lines.append(f"| {kind.removesuffix('_proj')} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_figure5(summaries: Sequence[RunSummary], path: str | Path, threshold: float = 0.1) -> Path:
    """Grouped bar chart (PNG): one group per module type, one bar per run."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    runs = [s for s in summaries if s.sv_counts is not None]
    if not runs:
        raise ValueError("no run has singular value counts to plot")
    fig = Figure(figsize=(1.2 * len(FIGURE5_MODULES) + 2, 4), dpi=120)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for i, s in enumerate(runs):
        xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(FIGURE5_MODULES))]
        ax.bar(xs, [s.sv_counts.get(k, 0.0) for k in FIGURE5_MODULES], width, label=f"{s.name} ({s.method})")
    ax.set_xticks(range(len(FIGURE5_MODULES)), [k.removesuffix("_proj") for k in FIGURE5_MODULES])
    ax.set_ylabel(f"singular values > {threshold:g}")
    ax.set_title("Singular values of $\\Delta W$ (mean over layers)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_report(summaries: Sequence[RunSummary], out_dir: str | Path, threshold: float = 0.1) -> dict[str, Path]:
    """report.md (Table 3, Figure 5 table and image), figure5.png and results.json in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md"}
    paths["results"].write_text(json.dumps([asdict(s) for s in summaries], indent=2) + "\n")
    source = {"metrics": "each run's final eval record in metrics.jsonl",
              "recomputed": "recomputed from each run's newest checkpoint, adapters merged"}
    sources = "; ".join(source[k] for k in sorted({s.perplexity_source for s in summaries}))
    text = [
        "# MoRA pretraining report\n",
        "## Table 3: C4 validation perplexity\n",
        table3_markdown(summaries),
        f"Perplexity is exp of the token-weighted mean cross-entropy ({sources}). The paper column "
        "is filled for 250M and 1.3B runs of LoRA, MoRA, ReLoRA and ReMoRA.\n",
    ]
    notes = [n for s in summaries if (n := label_note(s.name, s.method))]
    if notes:
        text.append("".join(f"Note: {n}.\n" for n in notes))
    if any(s.sv_counts is not None for s in summaries):
        paths["figure"] = plot_figure5(summaries, out / "figure5.png", threshold)
        text += [
            f"## Figure 5: singular values > {threshold:g} of dW = W_final - W_init\n",
            "Mean over layers, per module type, fp32, adapters merged into the final weights.\n",
            figure5_markdown(summaries),
            "![Figure 5](figure5.png)\n",
        ]
    paths["report"].write_text("\n".join(text))
    return paths
