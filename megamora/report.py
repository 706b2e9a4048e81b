"""The one report over runs grouped by method (one seed is the n = 1 case): Table 3 with the spread
over seeds, Figure 4 (loss and validation perplexity against step), Figure 5 (singular values of
dW), and a verdict against the paper's orderings, paired by seed (same seed = same base weights and
data order).

    results = [collect_run(method, run_dir) for ...]   # one finished run each, in the row `method`
    write_report(results, out_dir, methods=[...], recipe="cpu", paper="250m")

tools/reproduce.py (a recipe's methods x seeds, megamora.reproduce) and tools/report.py (named runs,
report_runs: a row each) both write it. A row is keyed by the recipe's method name (or the run's
NAME); its label, colour and Figure 5 family come from its runs' config.yaml (megamora.methods,
through the adapter registry): nothing here names an adapter kind. The numbers are those of the
single-run tools: perplexity is the run's own final eval record (what tools/eval_ppl.py RUN
recomputes), singular-value counts are analysis.run_singular_value_counts (what
tools/count_singular_values.py RUN prints).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from megamora.config import MODEL_PRESETS, ModelConfig, TrainConfig
from megamora.methods import FULL_RANK, Method, known_methods, method_of
from megamora.noise import NoiseFloor
from megamora.noise import beyond as beyond_noise
from megamora.noise import markdown as noise_markdown
from megamora.noise import percent as noise_percent
from megamora.noise import seed_spread as noise_spread
from megamora.noise import tag as noise_tag
from megamora.paper_numbers import PAPER_TABLE3, PAPER_TABLES, paper_perplexity

# The paper's facts, by the paper's labels (its numbers: megamora.paper_numbers). Table 3's ordering by perplexity, lowest first, and its headline pairs (lower, higher).
PAPER_PPL_ORDER = ("ReMoRA", "MoRA", "ReLoRA", "LoRA")
PAPER_PAIRS = (("MoRA", "LoRA"), ("ReMoRA", "ReLoRA"))
# Figure 5: high-rank methods have "far more" significant singular values than low-rank ones, read as
# at least this many times the count, on every seed.
FAR_ABOVE = 2.0
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")  # Figure 5's order
# A row whose method's colour an earlier row took (MoRA type 6 after MoRA) gets the next of these.
EXTRA_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
WARM_COLOUR = "#b3b3b3"
SMOOTH_FRACTION = 0.05  # Figure 4's training loss: centred moving average over 5% of the logged points


def preset_of(cfg: ModelConfig) -> Optional[str]:
    """The model preset a run used, also when its shapes were given field by field."""
    if cfg.preset:
        return cfg.preset
    shape = (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads)
    return next((name for name, s in MODEL_PRESETS.items() if s == shape), None)


# --------------------------------------------------------------------------- labels


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9+]+", text.lower()) if w]


def _names(label: str) -> set[str]:
    """The words that name a method in a free-text name: its label run together ("fullrank", "relora"),
    its first word ("full"), and a "+" spelled out ("LoRA+": "lora+", "loraplus", as in `lora_plus`)."""
    words = _words(label)
    names = {"".join(words), words[0]}
    return names | {n.replace("+", "plus") for n in names}


def row_label(key: str, method: Method) -> str:
    """How tables and legends name a row: its method's label, with what the key adds to it ("mora-type6"
    -> "MoRA (type6)"), or the whole key where the key does not name the method ("a" -> "LoRA (a)")."""
    names = _names(method.label)
    if "".join(_words(key)) in names:
        return method.label
    head, sep, rest = key.partition("-")
    if sep and rest and "".join(_words(head)) in names:
        return f"{method.label} ({rest})"
    return f"{method.label} ({key})"


def label_note(name: str, method: str) -> Optional[str]:
    """A note when the name a row was given names another method than its runs' config.yaml (`method`,
    a label). The method column always follows config.yaml; the name is kept in the row's label."""
    words = set(_words(name)) | {"".join(_words(name))}  # "lora_plus" also as "loraplus"
    named = {m.label for m in known_methods() if words & _names(m.label)}
    if not named or method in named:
        return None
    return (f"{name!r} is labelled {' / '.join(sorted(named))} but its config.yaml says {method}: "
            f"the method column follows config.yaml")


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    method: str  # the row's key: the recipe's method name, or the run's NAME (tools/report.py)
    seed: int
    run_dir: str
    step: int
    perplexity: float  # the run's final eval record, or recomputed (perplexity_source)
    tokens: int
    sv_counts: dict[str, float]  # per module type, mean over layers of #(singular values > threshold)
    ranks: dict[str, float]  # per module type, mean over layers of the numerical rank of dW
    config_method: Method  # methods.method_of(config.yaml); results.json holds its label
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, perplexity)
    restarts: list[int] = field(default_factory=list)  # steps of the merges
    perplexity_source: str = "metrics"  # "metrics": the run's final eval record; "recomputed": evaluate_run


def _records(run_dir: str | Path, kind: str) -> list[dict]:
    """read_metrics, with a damaged metrics.jsonl (e.g. a line cut short by a crash) named in one line."""
    from megamora.metrics import read_metrics

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


def curves(run_dir: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[int]]:
    """Training loss, validation perplexity and restart steps from metrics.jsonl (none without one); a
    step logged twice (a resume re-trains the steps after its checkpoint) keeps its later record."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return [], [], []
    train = {r["step"]: r["loss"] for r in _records(run_dir, "train")}
    evals = {r["step"]: r["perplexity"] for r in _records(run_dir, "eval")}
    restarts = sorted({r["step"] for r in _records(run_dir, "restart")})
    return sorted(train.items()), sorted(evals.items()), restarts


def spectrum(run_dir: str | Path, threshold: float = 0.1, device: str = "cpu",
             cache: Optional[Path] = None) -> tuple[dict[str, float], dict[str, float]]:
    """(singular-value counts, ranks) of dW of a run's newest checkpoint, cached in `cache` (a JSON
    file) under the checkpoint, its trainer_state.json's mtime and the threshold: SVDs of a big model
    take minutes, and a report is written again after every added run."""
    from megamora.analysis import numerical_ranks, run_deltas, singular_value_counts
    from megamora.export import find_checkpoint

    ckpt = find_checkpoint(run_dir)
    key = {"checkpoint": str(ckpt), "mtime_ns": (ckpt / "trainer_state.json").stat().st_mtime_ns,
           "threshold": threshold}
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return saved["sv_counts"], saved["ranks"]
        except (ValueError, KeyError, AttributeError):
            pass
    deltas = run_deltas(run_dir, ckpt, device)
    counts, ranks = singular_value_counts(deltas, threshold), numerical_ranks(deltas)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "sv_counts": counts, "ranks": ranks}) + "\n")
    return counts, ranks


def collect_run(method: str, run_dir: str | Path, *, threshold: float = 0.1, device: str = "cpu",
                cache: Optional[Path] = None, with_spectrum: bool = True, recompute_eval: bool = False,
                eval_tokens: Optional[int] = None, data_overrides: Sequence[str] = ()) -> RunResult:
    """A finished run's numbers, for the row `method` (a warm start needs no spectrum: with_spectrum=False).
    recompute_eval: perplexity from the newest checkpoint (evaluate_run, with `eval_tokens` and
    `data_overrides`) instead of the run's final eval record."""
    from megamora.export import run_config

    cfg = run_config(run_dir)
    check_logged_adapter(run_dir, cfg)
    if recompute_eval:
        from megamora.evaluate import evaluate_run

        final = evaluate_run(run_dir, tokens=eval_tokens, data_overrides=data_overrides, device=device)
    else:
        final = final_eval_record(run_dir)
    counts, ranks = spectrum(run_dir, threshold, device, cache) if with_spectrum else ({}, {})
    train, evals, restarts = curves(run_dir)
    return RunResult(method=method, seed=cfg.seed, run_dir=str(run_dir), step=int(final["step"]),
                     perplexity=float(final["perplexity"]), tokens=int(final["tokens"]), sv_counts=counts,
                     ranks=ranks, config_method=method_of(cfg), train=train, evals=evals, restarts=restarts,
                     perplexity_source="recomputed" if recompute_eval else "metrics")


# --------------------------------------------------------------------------- aggregation


@dataclass
class Spread:
    mean: float
    sd: Optional[float]  # sample standard deviation (n - 1); None for one value
    min: float
    max: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    values = list(values)
    if not values:
        raise ValueError("spread of no values")
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Spread(statistics.fmean(values), sd, min(values), max(values), len(values))


@dataclass
class MethodSummary:
    method: str  # the row's key
    label: str
    seeds: list[int]
    perplexity: Spread
    per_seed: dict[int, float]
    tokens: list[int]  # validation tokens of the final evals (one value when all agree)
    paper: Optional[float]
    sv_counts: dict[str, Spread]
    ranks: dict[str, Spread]
    sv_mean_per_seed: dict[int, float]  # mean over module types, per seed (the verdict's measure)
    config_method: Method  # its runs' method: colour and Figure 5 family (not in results.json)


def summarize(results: Sequence[RunResult], method: str, paper_preset: Optional[str] = None,
              label: Optional[str] = None) -> MethodSummary:
    """The row `method` over its runs; `label` default: row_label of its key and its runs' method."""
    runs = sorted((r for r in results if r.method == method), key=lambda r: r.seed)
    if not runs:
        raise ValueError(f"no finished run of {method}")
    kind = runs[0].config_method
    label = label or row_label(method, kind)
    kinds = [k for k in MODULES if all(k in r.sv_counts for r in runs)]
    return MethodSummary(
        method=method, label=label, seeds=[r.seed for r in runs],
        perplexity=spread([r.perplexity for r in runs]), per_seed={r.seed: r.perplexity for r in runs},
        tokens=sorted({r.tokens for r in runs}), paper=paper_perplexity(label, paper_preset),
        sv_counts={k: spread([r.sv_counts[k] for r in runs]) for k in kinds},
        ranks={k: spread([r.ranks[k] for r in runs]) for k in kinds if all(k in r.ranks for r in runs)},
        sv_mean_per_seed={r.seed: statistics.fmean(r.sv_counts[k] for k in kinds) for r in runs if kinds},
        config_method=kind,
    )


def summarize_rows(results: Sequence[RunResult], methods: Sequence[str],
                   paper_preset: Optional[str] = None) -> dict[str, MethodSummary]:
    """The rows of `methods` that have a finished run, in that order, with distinct labels (a row whose
    label an earlier row has is named by its whole key: "LoRA (lora_b)")."""
    rows: dict[str, MethodSummary] = {}
    for m in methods:
        if any(r.method == m for r in results):
            s = summarize(results, m, paper_preset)
            if any(s.label == other.label for other in rows.values()):
                s = summarize(results, m, paper_preset, label=f"{s.config_method.label} ({m})")
            rows[m] = s
    return rows


@dataclass
class Paired:
    """`lower` (a row's key) claimed to have the lower perplexity than `higher`, seed by seed."""
    lower: str
    higher: str
    seeds: list[int]
    n_lower: int  # seeds on which it is
    rel: dict[int, float]  # (higher - lower) / higher: > 0 where the claim holds
    floor: Optional[float] = None  # the perplexity noise floor it was judged against (None: none measured)
    beyond_noise: Optional[bool] = None  # every seed's difference beyond the floor, in one direction

    def sentence(self, a: str, b: str, noise: Optional[NoiseFloor] = None) -> str:
        """The finding in words, `a` and `b` being the labels of `lower` and `higher`, judged against
        the noise floor."""
        pct = sorted(100 * v for v in self.rel.values())
        n = len(self.seeds)
        if self.n_lower == n:
            text = f"{a} lower than {b} on {n}/{n} seeds, by {_range(pct)}%"
        elif self.n_lower == 0:
            text = f"{a} higher than {b} on {n}/{n} seeds, by {_range([-p for p in reversed(pct)])}%"
        else:
            text = (f"{a} lower than {b} on {self.n_lower}/{n} seeds (relative difference "
                    f"{_range(pct, signed=True)}%, positive where {a} is lower)")
        return text + noise_tag(self.rel, noise)


def _range(values: Sequence[float], signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    lo, hi = fmt.format(values[0]), fmt.format(values[-1])
    return lo if lo == hi else f"{lo} to {hi}" if signed else f"{lo}-{hi}"


def paired(results: Sequence[RunResult], lower: str, higher: str,
           noise: Optional[NoiseFloor] = None) -> Optional[Paired]:
    """Per seed that both rows finished: does `lower` have the lower perplexity, by how much, and is
    that beyond the noise floor."""
    a = {r.seed: r.perplexity for r in results if r.method == lower}
    b = {r.seed: r.perplexity for r in results if r.method == higher}
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    rel = {s: (b[s] - a[s]) / b[s] for s in seeds}
    floor = noise.perplexity if noise is not None else None
    return Paired(lower, higher, seeds, sum(1 for s in seeds if a[s] < b[s]), rel, floor,
                  None if floor is None else beyond_noise(rel, floor))


@dataclass
class Verdict:
    ppl_agrees: Optional[bool]  # None: fewer than two of the paper's rows finished
    ppl_lines: list[str]
    sv_agrees: Optional[bool]
    sv_lines: list[str]
    pairs: list[Paired]


def ppl_verdict(summaries: dict[str, MethodSummary], results: Sequence[RunResult],
                noise: Optional[NoiseFloor] = None) -> tuple[Optional[bool], list[str], list[Paired]]:
    """The paper's perplexity ordering, over the rows labelled as its rows (a variant row such as
    "MoRA (type6)", or a method the paper lacks, is not part of it); each pair judged against the noise
    floor."""
    by_label = {s.label: m for m, s in summaries.items()}
    rows = [by_label[label] for label in PAPER_PPL_ORDER if label in by_label]
    if len(rows) < 2:
        return None, ["Fewer than two of LoRA, MoRA, ReLoRA and ReMoRA finished: no ordering to compare."], []
    label = {m: s.label for m, s in summaries.items()}
    paper = " < ".join(label[m] for m in rows)
    ours_order = sorted(rows, key=lambda m: summaries[m].perplexity.mean)
    ours = " < ".join(f"{label[m]} ({summaries[m].perplexity.mean:.1f})" for m in ours_order)
    agrees = ours_order == rows
    lines = [f"Paper (Table 3): {paper}. Here, by mean perplexity: {ours}: "
             + ("**agrees**." if agrees else "**differs**.")]
    seeds = sorted(set.intersection(*(set(summaries[m].seeds) for m in rows)))
    if seeds:
        holds = [s for s in seeds if sorted(rows, key=lambda m: summaries[m].per_seed[s]) == rows]
        lines.append(f"The whole ordering holds on {len(holds)}/{len(seeds)} seeds"
                     + (f" ({', '.join(map(str, holds))})." if holds else "."))
    # Adjacent pairs of the paper's chain, then its headline pairs (MoRA vs LoRA, ReMoRA vs ReLoRA).
    wanted = list(zip(rows, rows[1:])) + [(by_label[lo], by_label[hi]) for lo, hi in PAPER_PAIRS
                                          if lo in by_label and hi in by_label]
    pairs, seen = [], set()
    for low, high in wanted:
        if (low, high) not in seen:
            seen.add((low, high))
            if (p := paired(results, low, high, noise)) is not None:
                pairs.append(p)
    if noise is not None and pairs:
        held = sum(1 for p in pairs if p.beyond_noise and p.n_lower == len(p.seeds))
        reversed_ = sum(1 for p in pairs if p.beyond_noise and p.n_lower == 0)
        lines[0] += (f" Of the paper's {len(pairs)} paired relations below, against a {noise_percent(noise.perplexity)} "
                     f"noise floor: {held} hold beyond noise on every seed, {reversed_} are reversed beyond noise, "
                     f"{len(pairs) - held - reversed_} are within noise.")
    elif pairs:
        lines[0] += " No noise floor was measured: the paired differences below are not judged against one."
    lines += [f"Paired by seed: {p.sentence(label[p.lower], label[p.higher], noise)}." for p in pairs]
    return agrees, lines, pairs


def sv_verdict(summaries: dict[str, MethodSummary],
               noise: Optional[NoiseFloor] = None) -> tuple[Optional[bool], list[str]]:
    """Figure 5's claim: every high-rank method (methods.Method.high_rank: MoRA, ReMoRA, ...) has far
    more singular values above the threshold than every low-rank one (LoRA, ReLoRA, ...). Full-rank
    training is the reference, in neither family. Where both families have one of the paper's rows,
    the verdict is the paper's claim, over its rows; every other pair is measured and listed, but a
    method the paper did not run (DoRA, APOLLO) neither confirms nor refutes it."""
    counted = {m: s for m, s in summaries.items() if s.sv_mean_per_seed and s.config_method != FULL_RANK}
    highs = [m for m, s in counted.items() if s.config_method.high_rank]
    lows = [m for m, s in counted.items() if not s.config_method.high_rank]
    if not highs or not lows:
        return None, ["MoRA / ReMoRA and LoRA / ReLoRA are not both present: no singular-value comparison."]
    paper = set(PAPER_PPL_ORDER)
    if any(summaries[m].label in paper for m in highs) and any(summaries[m].label in paper for m in lows):
        judged = {(h, low) for h in highs for low in lows if {summaries[h].label, summaries[low].label} <= paper}
    else:
        judged = {(h, low) for h in highs for low in lows}
    lines, agrees = [], True
    for h in highs:
        for low in lows:
            a, b = summaries[h].sv_mean_per_seed, summaries[low].sv_mean_per_seed
            seeds = sorted(a.keys() & b.keys())
            if not seeds:
                continue
            ratios = sorted(a[s] / b[s] if b[s] else math.inf for s in seeds)
            far = all(r >= FAR_ABOVE for r in ratios)
            if (h, low) in judged:
                agrees &= far
            kinds = [k for k in summaries[h].sv_counts if k in summaries[low].sv_counts]
            above = sum(1 for k in kinds if summaries[h].sv_counts[k].min > summaries[low].sv_counts[k].max)
            high_label, low_label = summaries[h].label, summaries[low].label
            lines.append(
                f"{high_label} {statistics.fmean(a[s] for s in seeds):.1f} vs {low_label} "
                f"{statistics.fmean(b[s] for s in seeds):.1f} singular values per module (mean over module types "
                f"and seeds); {_ratio_range(ratios)} times as many on {len(seeds)}/{len(seeds)} paired seeds"
                f"{'' if far else f' (below {FAR_ABOVE:g}x on some seed)'}; its smallest count over seeds exceeds "
                f"{low_label}'s largest on {above}/{len(kinds)} module types"
                + noise_tag({s: (a[s] - b[s]) / b[s] if b[s] else math.inf for s in seeds}, noise,
                            "singular_values") + ".")
    rows_h = [m for m in highs if any((m, low) in judged for low in lows)]
    rows_l = [m for m in lows if any((h, m) in judged for h in highs)]
    head = (f"{' / '.join(summaries[m].label for m in rows_h)} have far more singular values > threshold than "
            f"{' / '.join(summaries[m].label for m in rows_l)} (at least {FAR_ABOVE:g}x on every seed): "
            + ("**agrees** with the paper's Figure 5." if agrees else "**does not hold** on every seed.")
            + ("" if len(judged) == len(highs) * len(lows) else
               " The other pairs below are measured; the paper did not run those methods."))
    return agrees, [head, *lines]


def _ratio_range(ratios: Sequence[float]) -> str:
    lo, hi = f"{ratios[0]:.1f}", f"{ratios[-1]:.1f}"
    return lo if lo == hi else f"{lo}-{hi}"


def verdict(summaries: dict[str, MethodSummary], results: Sequence[RunResult],
            noise: Optional[NoiseFloor] = None) -> Verdict:
    ppl_ok, ppl_lines, pairs = ppl_verdict(summaries, results, noise)
    sv_ok, sv_lines = sv_verdict(summaries, noise)
    return Verdict(ppl_ok, ppl_lines, sv_ok, sv_lines, pairs)


# --------------------------------------------------------------------------- figures


def colours(summaries: dict[str, MethodSummary]) -> dict[str, str]:
    """A row's colour is its method's; a row whose method's colour an earlier row took gets an extra one."""
    out: dict[str, str] = {}
    extra = iter(EXTRA_COLOURS * 3)
    for m, s in summaries.items():
        colour = s.config_method.colour
        while colour in out.values():
            colour = next(extra)
        out[m] = colour
    return out


def smooth(values: Sequence[float], fraction: float = SMOOTH_FRACTION, least: int = 3) -> list[float]:
    """Centred moving average over `fraction` of the points, at least `least` (an odd window, shrinking
    at the ends; centred, it does not lag behind the curve as an EMA does)."""
    n = len(values)
    half = max(least, int(round(fraction * n))) // 2
    out = []
    for i in range(n):
        w = min(half, i, n - 1 - i)
        window = values[i - w:i + w + 1]
        out.append(sum(window) / len(window))
    return out


def _aligned(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[list[float]]]:
    """The steps every series has, and each series' values at them."""
    steps = sorted(set.intersection(*(set(s for s, _ in ser) for ser in series))) if series else []
    maps = [dict(ser) for ser in series]
    return steps, [[m[s] for s in steps] for m in maps]


def _band(ax, steps, rows, colour, label, marker=None, offset=0):
    xs = [s + offset for s in steps]
    cols = list(zip(*rows))
    mean = [statistics.fmean(c) for c in cols]
    ax.plot(xs, mean, color=colour, label=label, lw=1.6, marker=marker, ms=3.5)
    if len(rows) > 1:
        ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=colour, alpha=0.18, lw=0)
    return mean


def _plain_log_formatter(**kw):
    """matplotlib's LogFormatter choice of which ticks to label, written as plain numbers (1500, 20000)."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def __call__(self, x, pos=None):
            return (f"{x:.0f}" if x >= 1 else f"{x:g}") if super().__call__(x, pos) else ""

    return PlainLog(**kw)


def plot_figure4(results: Sequence[RunResult], summaries: dict[str, MethodSummary], path: str | Path,
                 warm: Sequence[RunResult] = (), title: str = "") -> Path:
    """Two panels: training loss (smoothed) and validation perplexity against step, per row the mean
    over seeds with a min-max band; restart merges as dotted lines. A full-rank warm start is drawn in
    grey at negative steps, ending at 0 where every method starts from its weights (adapters start at
    zero: at step 0 each method's perplexity is the warm start's final one)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

    col = colours(summaries)
    label = {m: s.label for m, s in summaries.items()}
    fig = Figure(figsize=(13, 5.4), dpi=120)
    loss_ax, ppl_ax = fig.subplots(1, 2)
    offset = -max((r.step for r in warm), default=0)
    warm_end = {r.seed: r.evals[-1] for r in warm if r.evals and r.evals[-1][0] == r.step}
    n_seeds = len({r.seed for r in results})
    lows, highs = [], []

    def smoothed(run: RunResult) -> list[tuple[int, float]]:
        return list(zip([s for s, _ in run.train], smooth([v for _, v in run.train])))

    if warm:
        steps, rows = _aligned([smoothed(r) for r in warm])
        if steps:
            _band(loss_ax, steps, rows, WARM_COLOUR, "full-rank warm start", offset=offset)
        steps, rows = _aligned([r.evals for r in warm])
        if steps:
            _band(ppl_ax, steps, rows, WARM_COLOUR, "full-rank warm start", marker="o", offset=offset)
    merges: dict[int, list[str]] = {}
    for m in summaries:
        runs = [r for r in results if r.method == m]
        steps, rows = _aligned([smoothed(r) for r in runs])
        if steps:
            mean = _band(loss_ax, steps, rows, col[m], label[m])
            tail = mean[len(mean) // 10:] or mean  # the y range follows the methods past their first steps
            lows.append(min(min(r) for r in zip(*rows)))
            highs.append(max(tail))
        start = [[(0, warm_end[r.seed][1])] if r.seed in warm_end else [] for r in runs]
        steps, rows = _aligned([s + r.evals for s, r in zip(start, runs)])
        if steps:
            _band(ppl_ax, steps, rows, col[m], label[m], marker="o")
        for step in sorted({s for r in runs for s in r.restarts}):
            merges.setdefault(step, []).append(m)
    # One dotted line per merge step, in the method's colour, or dark grey where several merge at once.
    labelled = set()
    for step, ms in sorted(merges.items()):
        key = tuple(ms)
        colour = col[ms[0]] if len(ms) == 1 else "#333333"
        legend = None if key in labelled else f"merge + restart ({', '.join(label[m] for m in ms)})"
        labelled.add(key)
        for ax in (loss_ax, ppl_ax):
            ax.axvline(step, color=colour, ls=":", lw=1.2, alpha=0.9, label=legend if ax is loss_ax else None)
    if warm:
        for ax in (loss_ax, ppl_ax):
            ax.axvline(0, color=WARM_COLOUR, ls="--", lw=1,
                       label="methods start from the warm start" if ax is loss_ax else None)
    if lows and highs:
        lo, hi = min(lows), max(highs)
        pad = 0.08 * (hi - lo or 1)
        loss_ax.set_ylim(lo - pad, hi + pad)
    ppl_ax.set_yscale("log")
    ppl_ax.yaxis.set_major_formatter(_plain_log_formatter(labelOnlyBase=False))
    ppl_ax.yaxis.set_minor_formatter(_plain_log_formatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    band = f"mean over {n_seeds} seeds, band: min-max" if n_seeds > 1 else "one seed"
    loss_ax.set_title(f"Training loss ({band});\ncentred moving average over {SMOOTH_FRACTION:.0%} of the logged "
                      "steps (at least 3)", fontsize="medium")
    ppl_ax.set_title(f"C4 validation perplexity ({band})", fontsize="medium")
    xlabel = "step (0 = end of the full-rank warm start)" if warm else "step"
    for ax, ylabel in ((loss_ax, "training loss (cross-entropy)"), (ppl_ax, "validation perplexity (log scale)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize="small", frameon=False)
    fig.suptitle(title or "Figure 4: pretraining loss and validation perplexity")
    rows_of_legend = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, 0.045 * rows_of_legend + 0.02, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_figure5(summaries: dict[str, MethodSummary], path: str | Path, threshold: float = 0.1,
                 title: str = "") -> Path:
    """Grouped bars: per module type, per row the mean over seeds of the count of singular values
    > threshold of dW (each run: mean over layers); whiskers: min-max over seeds."""
    from matplotlib.figure import Figure

    methods = [m for m, s in summaries.items() if s.sv_counts]
    if not methods:
        raise ValueError("no run has singular value counts to plot")
    col = colours(summaries)
    kinds = [k for k in MODULES if any(k in summaries[m].sv_counts for m in methods)]
    fig = Figure(figsize=(max(8.0, 1.3 * len(kinds) + 2.5), 5), dpi=120)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    top = 0.0
    for i, m in enumerate(methods):
        s = summaries[m]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(kinds))]
        sp = [s.sv_counts.get(k) for k in kinds]
        means = [p.mean if p else 0.0 for p in sp]
        err = [[p.mean - p.min if p else 0 for p in sp], [p.max - p.mean if p else 0 for p in sp]]
        ax.bar(xs, means, width, color=col[m], label=f"{s.label} (n={len(s.seeds)})", edgecolor="white", lw=0.5,
               yerr=err if len(s.seeds) > 1 else None, capsize=2.5, error_kw={"lw": 1, "ecolor": "#222222"})
        top = max(top, *(p.max for p in sp if p))
    ax.set_xticks(range(len(kinds)), [k.removesuffix("_proj") for k in kinds])
    ax.set_xlabel("module type")
    ax.set_ylabel(f"singular values > {threshold:g} (mean over layers)")
    ax.set_ylim(0, top * 1.12 or 1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    n = max(len(summaries[m].seeds) for m in methods)
    spread_note = ", whiskers: min-max over seeds" if n > 1 else ""
    ax.set_title(title or f"Figure 5: singular values > {threshold:g} of $\\Delta W = W_{{final}} - W_{{init}}$ "
                          f"(bars: mean over seeds{spread_note})", fontsize="medium")
    ax.legend(fontsize="small", ncol=min(len(methods), 6), loc="upper center", bbox_to_anchor=(0.5, -0.13),
              frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- the report


def _pm(sp: Spread, fmt: str = "{:.2f}") -> str:
    return fmt.format(sp.mean) + ("" if sp.sd is None else " ± " + fmt.format(sp.sd))


def _mm(sp: Spread, fmt: str = "{:.1f}") -> str:
    return fmt.format(sp.mean) if sp.n == 1 else f"{fmt.format(sp.mean)} ({fmt.format(sp.min)}-{fmt.format(sp.max)})"


def table3_markdown(summaries: dict[str, MethodSummary], seeds: Sequence[int]) -> str:
    paper = any(s.paper is not None for s in summaries.values())
    head = ["method", "seeds", "eval tokens", "perplexity (mean ± sd)", "min-max", *[f"seed {s}" for s in seeds]]
    head += ["paper"] if paper else []
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for s in summaries.values():
        cells = [s.label, str(len(s.seeds)), " / ".join(map(str, s.tokens)), _pm(s.perplexity),
                 f"{s.perplexity.min:.2f}-{s.perplexity.max:.2f}",
                 *[f"{s.per_seed[x]:.2f}" if x in s.per_seed else "" for x in seeds]]
        cells += [f"{s.paper:.2f}" if s.paper is not None else ""] if paper else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def module_table(summaries: dict[str, MethodSummary], what: str) -> str:
    rows = {m: getattr(s, what) for m, s in summaries.items() if getattr(s, what)}
    if not rows:
        return ""
    lines = ["| module | " + " | ".join(summaries[m].label for m in rows) + " |", "|---|" + "---:|" * len(rows)]
    for k in MODULES:
        if any(k in r for r in rows.values()):
            cells = " | ".join(_mm(r[k]) if k in r else "" for r in rows.values())
            lines.append(f"| {k.removesuffix('_proj')} | {cells} |")
    return "\n".join(lines) + "\n"


def label_notes(summaries: dict[str, MethodSummary]) -> list[str]:
    """label_note of every row: its key against its runs' config.yaml."""
    return [n for m, s in summaries.items() if (n := label_note(m, s.config_method.label))]


def _clean(obj):
    """JSON-safe: seed keys as strings, inf as null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _run_record(r: RunResult) -> dict:
    """A run in results.json: its numbers, without the curves, its method by label."""
    record = {k: v for k, v in asdict(r).items() if k not in ("train", "evals")}
    return {**record, "config_method": r.config_method.label}


_SOURCES = {"metrics": "Each run's final eval (its last record in metrics.jsonl; `tools/eval_ppl.py RUN` recomputes "
                       "it from the checkpoint)",
            "recomputed": "Recomputed from each run's newest checkpoint, adapters merged (`tools/eval_ppl.py RUN`)"}


def write_report(results: Sequence[RunResult], out_dir: str | Path, *, methods: Optional[Sequence[str]] = None,
                 seeds: Optional[Sequence[int]] = None, recipe: Optional[str] = None, paper: Optional[str] = None,
                 warm: Sequence[RunResult] = (), missing: Sequence[str] = (), threshold: float = 0.1,
                 description: str = "", noise: Optional[NoiseFloor] = None) -> dict[str, Path]:
    """report.md, results.json, figure4.png and (where runs have singular-value counts) figure5.png in
    `out_dir`. Rows: `methods` in order (default: as the results come), each over its seeds; `recipe`
    names a reproduction in the title; `paper`: the preset whose Table 3 numbers go beside ours;
    `noise`: the floor every paired difference of the verdict is judged against (megamora.noise)."""
    out = Path(out_dir)
    methods = list(methods) if methods is not None else list(dict.fromkeys(r.method for r in results))
    seeds = list(seeds) if seeds is not None else sorted({r.seed for r in results})
    summaries = summarize_rows(results, methods, paper)
    if not summaries:
        raise ValueError("no finished run to report on")
    out.mkdir(parents=True, exist_ok=True)
    v = verdict(summaries, results, noise)
    spectra = any(s.sv_counts for s in summaries.values())
    paths = {"report": out / "report.md", "results": out / "results.json"}
    paths["figure4"] = plot_figure4(results, summaries, out / "figure4.png", warm)
    if spectra:
        paths["figure5"] = plot_figure5(summaries, out / "figure5.png", threshold)

    label = {m: summaries[m].label if m in summaries else m for m in methods}
    merging = [s.label for m, s in summaries.items() if any(r.restarts for r in results if r.method == m)]
    sources = "; ".join(_SOURCES[k] for k in sorted({r.perplexity_source for r in results}))
    text = [f"# Reproduction of the MoRA paper's pretraining comparison: recipe `{recipe}`\n" if recipe
            else "# MoRA pretraining report\n"]
    if description:
        text.append(description + "\n")
    text.append(f"Seeds {', '.join(map(str, seeds))}; methods {', '.join(label[m] for m in methods)}; "
                f"{len(results)} finished runs"
                + (f" (a full-rank warm start of {warm[0].step} steps per seed first)" if warm else "")
                + ". Same seed = same base weights and data order, so methods are compared paired by seed.\n")
    if missing:
        text.append(f"Not finished (left out): {', '.join(missing)}.\n")
    text += [
        "## Table 3: C4 validation perplexity\n",
        table3_markdown(summaries, seeds),
        f"{sources}: exp of the token-weighted mean cross-entropy over the eval tokens shown. sd is the "
        "sample standard deviation over seeds."
        + (f" Paper: {PAPER_TABLES[paper].title}." if paper else "") + "\n",
        "## Figure 4: training loss and validation perplexity\n",
        "![Figure 4](figure4.png)\n",
        f"Left: training loss, smoothed per run with a centred moving average over {SMOOTH_FRACTION:.0%} of its "
        "logged steps (at least 3), then averaged over seeds (band: min-max over seeds)"
        + (f"; dotted lines: {' / '.join(merging)} merges" if merging else "")
        + ". Right: the eval records (log scale)." + (" Grey, at negative steps: the full-rank warm start every "
                                                          "method starts from at step 0." if warm else "") + "\n",
    ]
    if spectra:
        text += [
            f"## Figure 5: singular values > {threshold:g} of dW = W_final - W_init\n",
            "![Figure 5](figure5.png)\n",
            f"Per module type, the mean over layers of the number of singular values > {threshold:g} of dW "
            "(`tools/count_singular_values.py RUN`); W_init is the seeded initialisation"
            + (", or the warm start's weights for warm-started runs" if warm else "")
            + ". Cells: mean over seeds (min-max).\n",
            module_table(summaries, "sv_counts"),
            "Numerical rank of dW (mean over layers; singular values above max(m, n) * eps(fp32) * sigma_max):\n",
            module_table(summaries, "ranks"),
        ]
    if noise is not None:
        spread_by_row = noise_spread({m: s.per_seed for m, s in summaries.items()})
        text += ["## Noise floor\n", noise_markdown(noise, label, spread_by_row)]
    text += [
        "## Verdict\n",
        "**Perplexity.** " + v.ppl_lines[0] + "\n",
        "".join(f"- {line}\n" for line in v.ppl_lines[1:]),
    ]
    if spectra:
        text += ["**Singular values.** " + v.sv_lines[0] + "\n", "".join(f"- {line}\n" for line in v.sv_lines[1:])]
    if notes := label_notes(summaries):
        text.append("".join(f"Note: {n}.\n" for n in notes))
    paths["report"].write_text("\n".join(text))

    data = {"recipe": recipe, "paper": paper, "seeds": seeds, "methods": methods, "threshold": threshold,
            "missing": list(missing),
            "summary": {m: {k: val for k, val in asdict(s).items() if k != "config_method"}
                        for m, s in summaries.items()},
            "paired": [asdict(p) for p in v.pairs],
            "noise_floor": asdict(noise) if noise is not None else None,
            "verdict": {"perplexity_agrees": v.ppl_agrees, "perplexity": v.ppl_lines,
                        "singular_values_agree": v.sv_agrees, "singular_values": v.sv_lines},
            "runs": [_run_record(r) for r in results], "warm_starts": [_run_record(r) for r in warm]}
    paths["results"].write_text(json.dumps(_clean(data), indent=2) + "\n")
    return paths


def report_runs(runs: Sequence[tuple[str, str | Path]], out_dir: str | Path, *, recompute_eval: bool = False,
                with_spectrum: bool = True, threshold: float = 0.1, data_overrides: Sequence[str] = (),
                eval_tokens: Optional[int] = None, device: str = "cpu") -> tuple[dict[str, Path], list[str]]:
    """The report over named runs, one row each (n = 1, tools/report.py): write_report's paths and the
    label notes. The paper column is that of the runs' model preset where they share one."""
    from megamora.export import run_config

    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be distinct, got {names}")
    results = [collect_run(name, run_dir, threshold=threshold, device=device, with_spectrum=with_spectrum,
                           recompute_eval=recompute_eval, eval_tokens=eval_tokens, data_overrides=data_overrides)
               for name, run_dir in runs]
    presets = {preset_of(run_config(run_dir).model) for _, run_dir in runs}
    paper = presets.pop() if len(presets) == 1 and presets <= set(PAPER_TABLE3) else None
    paths = write_report(results, out_dir, methods=names, paper=paper, threshold=threshold)
    return paths, label_notes(summarize_rows(results, names, paper))
