"""The paper's comparison over methods x seeds: Table 3 with the spread over seeds, Figure 4 (loss and
validation perplexity against step), Figure 5 (singular values of dW), and a verdict against the
paper's orderings, paired by seed (same seed = same base weights and data order).

    results = [collect_run(method, seed, run_dir) for ...]   # one finished run each
    write_comparison(results, out_dir, recipe="cpu", methods=[...], seeds=[...], paper="250m")

The numbers are those of the single-run tools: perplexity is the run's own final eval record (what
tools/eval_ppl.py RUN recomputes), singular-value counts are report.run_singular_value_counts (what
tools/count_singular_values.py RUN prints).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from megamora.recipes import PAPER_METHODS, method_label

# Paper's orderings. Perplexity, lowest first (Table 3); singular values: rows with far more
# significant singular values than the others (Figure 5).
PAPER_PPL_ORDER = ("remora", "mora", "relora", "lora")
HIGH_RANK, LOW_RANK = ("mora", "remora"), ("lora", "relora")
FAR_ABOVE = 2.0  # "far above" = at least this many times the count, on every seed
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")  # Figure 5's order
# One colour per method in every figure: LoRA family blues, MoRA family reds, full rank grey.
COLOURS = {"full": "#555555", "lora": "#6baed6", "relora": "#08519c", "mora": "#fb6a4a", "remora": "#a50f15"}
EXTRA_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
WARM_COLOUR = "#b3b3b3"
SMOOTH_FRACTION = 0.05  # Figure 4's training loss: centred moving average over 5% of the logged points


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    method: str  # the recipe's key
    seed: int
    run_dir: str
    step: int
    perplexity: float  # the run's final eval record
    tokens: int
    sv_counts: dict[str, float]  # per module type, mean over layers of #(singular values > threshold)
    ranks: dict[str, float]  # per module type, mean over layers of the numerical rank of dW
    config_method: str = ""  # report.method_of(config.yaml): LoRA, MoRA, ReLoRA, ReMoRA, Full-rank
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, perplexity)
    restarts: list[int] = field(default_factory=list)  # steps of the merges


def curves(run_dir: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[int]]:
    """Training loss, validation perplexity and restart steps from metrics.jsonl; a step logged twice
    (a resume re-trains the steps after its checkpoint) keeps its later record."""
    from megamora.report import _records

    train = {r["step"]: r["loss"] for r in _records(run_dir, "train")}
    evals = {r["step"]: r["perplexity"] for r in _records(run_dir, "eval")}
    restarts = sorted({r["step"] for r in _records(run_dir, "restart")})
    return sorted(train.items()), sorted(evals.items()), restarts


def dw_ranks(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu") -> dict[str, float]:
    """Per module type, the mean over layers of the numerical rank of dW = W_final - W_init
    (analysis.rank_of; same dW as report.run_singular_value_counts)."""
    from megamora.analysis import delta_weights, module_type, rank_of
    from megamora.export import initial_weights, load_merged_model
    from megamora.report import find_checkpoint

    _, model = load_merged_model(run_dir, find_checkpoint(run_dir, checkpoint))
    current = {k: v.to(device) for k, v in model.state_dict().items() if module_type(k)}
    ranks: dict[str, list[int]] = {}
    for name, dw in delta_weights(initial_weights(run_dir), current).items():
        ranks.setdefault(module_type(name), []).append(rank_of(dw))
    return {k: sum(v) / len(v) for k, v in ranks.items()}


def spectrum(run_dir: str | Path, threshold: float = 0.1, device: str = "cpu",
             cache: Optional[Path] = None) -> tuple[dict[str, float], dict[str, float]]:
    """(singular-value counts, ranks) of a run's newest checkpoint, cached in `cache` (a JSON file)
    under the checkpoint, its trainer_state.json's mtime and the threshold: SVDs of a big model take
    minutes, and a report is written again after every added run."""
    from megamora.report import find_checkpoint, run_singular_value_counts

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
    counts = run_singular_value_counts(run_dir, ckpt, threshold, device)
    ranks = dw_ranks(run_dir, ckpt, device)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "sv_counts": counts, "ranks": ranks}) + "\n")
    return counts, ranks


def collect_run(method: str, seed: int, run_dir: str | Path, threshold: float = 0.1, device: str = "cpu",
                cache: Optional[Path] = None, with_spectrum: bool = True) -> RunResult:
    """A finished run's numbers for the comparison (a warm start needs no spectrum: with_spectrum=False)."""
    from megamora.export import run_config
    from megamora.report import check_logged_adapter, final_eval_record, method_of

    cfg = run_config(run_dir)
    check_logged_adapter(run_dir, cfg)
    final = final_eval_record(run_dir)
    counts, ranks = spectrum(run_dir, threshold, device, cache) if with_spectrum else ({}, {})
    train, evals, restarts = curves(run_dir)
    return RunResult(method=method, seed=seed, run_dir=str(run_dir), step=int(final["step"]),
                     perplexity=float(final["perplexity"]), tokens=int(final["tokens"]), sv_counts=counts,
                     ranks=ranks, config_method=method_of(cfg), train=train, evals=evals, restarts=restarts)


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
    method: str
    label: str
    seeds: list[int]
    perplexity: Spread
    per_seed: dict[int, float]
    tokens: list[int]  # validation tokens of the final evals (one value when all agree)
    paper: Optional[float]
    sv_counts: dict[str, Spread]
    ranks: dict[str, Spread]
    sv_mean_per_seed: dict[int, float]  # mean over module types, per seed (the verdict's measure)


def summarize(results: Sequence[RunResult], method: str, paper_preset: Optional[str] = None) -> MethodSummary:
    from megamora.report import paper_perplexity

    runs = sorted((r for r in results if r.method == method), key=lambda r: r.seed)
    if not runs:
        raise ValueError(f"no finished run of {method}")
    label = method_label(method)
    kinds = [k for k in MODULES if all(k in r.sv_counts for r in runs)]
    return MethodSummary(
        method=method, label=label, seeds=[r.seed for r in runs],
        perplexity=spread([r.perplexity for r in runs]), per_seed={r.seed: r.perplexity for r in runs},
        tokens=sorted({r.tokens for r in runs}),
        paper=paper_perplexity(label, paper_preset) if method in PAPER_METHODS else None,
        sv_counts={k: spread([r.sv_counts[k] for r in runs]) for k in kinds},
        ranks={k: spread([r.ranks[k] for r in runs]) for k in kinds if all(k in r.ranks for r in runs)},
        sv_mean_per_seed={r.seed: statistics.fmean(r.sv_counts[k] for k in kinds) for r in runs if kinds},
    )


@dataclass
class Paired:
    """`lower` (a method key) claimed to have the lower perplexity than `higher`, seed by seed."""
    lower: str
    higher: str
    seeds: list[int]
    n_lower: int  # seeds on which it is
    rel: dict[int, float]  # (higher - lower) / higher: > 0 where the claim holds

    def sentence(self) -> str:
        a, b = method_label(self.lower), method_label(self.higher)
        pct = sorted(100 * v for v in self.rel.values())
        n = len(self.seeds)
        if self.n_lower == n:
            return f"{a} lower than {b} on {n}/{n} seeds, by {_range(pct)}%"
        if self.n_lower == 0:
            return f"{a} higher than {b} on {n}/{n} seeds, by {_range([-p for p in reversed(pct)])}%"
        return (f"{a} lower than {b} on {self.n_lower}/{n} seeds (relative difference {_range(pct, signed=True)}%, "
                f"positive where {a} is lower)")


def _range(values: Sequence[float], signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    lo, hi = fmt.format(values[0]), fmt.format(values[-1])
    return lo if lo == hi else f"{lo} to {hi}" if signed else f"{lo}-{hi}"


def paired(results: Sequence[RunResult], lower: str, higher: str) -> Optional[Paired]:
    """Per seed that both methods finished: does `lower` have the lower perplexity, and by how much."""
    a = {r.seed: r.perplexity for r in results if r.method == lower}
    b = {r.seed: r.perplexity for r in results if r.method == higher}
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    rel = {s: (b[s] - a[s]) / b[s] for s in seeds}
    return Paired(lower, higher, seeds, sum(1 for s in seeds if a[s] < b[s]), rel)


@dataclass
class Verdict:
    ppl_agrees: Optional[bool]  # None: fewer than two of the paper's rows finished
    ppl_lines: list[str]
    sv_agrees: Optional[bool]
    sv_lines: list[str]
    pairs: list[Paired]


def ppl_verdict(summaries: dict[str, MethodSummary],
                results: Sequence[RunResult]) -> tuple[Optional[bool], list[str], list[Paired]]:
    rows = [m for m in PAPER_PPL_ORDER if m in summaries]
    if len(rows) < 2:
        return None, ["Fewer than two of LoRA, MoRA, ReLoRA and ReMoRA finished: no ordering to compare."], []
    paper = " < ".join(method_label(m) for m in rows)
    ours_order = sorted(rows, key=lambda m: summaries[m].perplexity.mean)
    ours = " < ".join(f"{method_label(m)} ({summaries[m].perplexity.mean:.1f})" for m in ours_order)
    agrees = ours_order == rows
    lines = [f"Paper (Table 3): {paper}. Here, by mean perplexity: {ours}: "
             + ("**agrees**." if agrees else "**differs**.")]
    seeds = sorted(set.intersection(*(set(summaries[m].seeds) for m in rows)))
    if seeds:
        holds = [s for s in seeds if sorted(rows, key=lambda m: summaries[m].per_seed[s]) == rows]
        lines.append(f"The whole ordering holds on {len(holds)}/{len(seeds)} seeds"
                     + (f" ({', '.join(map(str, holds))})." if holds else "."))
    # Adjacent pairs of the paper's chain, then its headline pairs (MoRA vs LoRA, ReMoRA vs ReLoRA).
    wanted = list(zip(rows, rows[1:])) + [("mora", "lora"), ("remora", "relora")]
    pairs, seen = [], set()
    for low, high in wanted:
        if low in summaries and high in summaries and (low, high) not in seen:
            seen.add((low, high))
            if (p := paired(results, low, high)) is not None:
                pairs.append(p)
    lines += [f"Paired by seed: {p.sentence()}." for p in pairs]
    return agrees, lines, pairs


def sv_verdict(summaries: dict[str, MethodSummary]) -> tuple[Optional[bool], list[str]]:
    highs = [m for m in HIGH_RANK if m in summaries and summaries[m].sv_mean_per_seed]
    lows = [m for m in LOW_RANK if m in summaries and summaries[m].sv_mean_per_seed]
    if not highs or not lows:
        return None, ["MoRA / ReMoRA and LoRA / ReLoRA are not both present: no singular-value comparison."]
    lines, agrees = [], True
    for h in highs:
        for low in lows:
            a, b = summaries[h].sv_mean_per_seed, summaries[low].sv_mean_per_seed
            seeds = sorted(a.keys() & b.keys())
            if not seeds:
                continue
            ratios = sorted(a[s] / b[s] if b[s] else math.inf for s in seeds)
            far = all(r >= FAR_ABOVE for r in ratios)
            agrees &= far
            kinds = [k for k in summaries[h].sv_counts if k in summaries[low].sv_counts]
            above = sum(1 for k in kinds if summaries[h].sv_counts[k].min > summaries[low].sv_counts[k].max)
            lines.append(
                f"{method_label(h)} {statistics.fmean(a[s] for s in seeds):.1f} vs {method_label(low)} "
                f"{statistics.fmean(b[s] for s in seeds):.1f} singular values per module (mean over module types "
                f"and seeds); {_ratio_range(ratios)} times as many on {len(seeds)}/{len(seeds)} paired seeds"
                f"{'' if far else f' (below {FAR_ABOVE:g}x on some seed)'}; its smallest count over seeds exceeds "
                f"{method_label(low)}'s largest on {above}/{len(kinds)} module types.")
    head = ("MoRA / ReMoRA have far more singular values > threshold than LoRA / ReLoRA "
            f"(at least {FAR_ABOVE:g}x on every seed): " + ("**agrees** with the paper's Figure 5." if agrees
                                                             else "**does not hold** on every seed."))
    return agrees, [head, *lines]


def _ratio_range(ratios: Sequence[float]) -> str:
    lo, hi = f"{ratios[0]:.1f}", f"{ratios[-1]:.1f}"
    return lo if lo == hi else f"{lo}-{hi}"


def verdict(summaries: dict[str, MethodSummary], results: Sequence[RunResult]) -> Verdict:
    ppl_ok, ppl_lines, pairs = ppl_verdict(summaries, results)
    sv_ok, sv_lines = sv_verdict(summaries)
    return Verdict(ppl_ok, ppl_lines, sv_ok, sv_lines, pairs)


# --------------------------------------------------------------------------- figures


def colours(methods: Sequence[str]) -> dict[str, str]:
    extra = iter(EXTRA_COLOURS * 3)
    return {m: COLOURS.get(m) or next(extra) for m in methods}


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


def plot_figure4(results: Sequence[RunResult], methods: Sequence[str], path: str | Path,
                 warm: Sequence[RunResult] = (), title: str = "") -> Path:
    """Two panels: training loss (smoothed) and validation perplexity against step, per method the
    mean over seeds with a min-max band; ReLoRA / ReMoRA merges as dotted lines. A full-rank warm
    start is drawn in grey at negative steps, ending at 0 where every method starts from its weights
    (adapters start at zero: at step 0 each method's perplexity is the warm start's final one)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

    col = colours(methods)
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
    for m in methods:
        runs = [r for r in results if r.method == m]
        if not runs:
            continue
        label = method_label(m)
        steps, rows = _aligned([smoothed(r) for r in runs])
        if steps:
            mean = _band(loss_ax, steps, rows, col[m], label)
            tail = mean[len(mean) // 10:] or mean  # the y range follows the methods past their first steps
            lows.append(min(min(r) for r in zip(*rows)))
            highs.append(max(tail))
        start = [[(0, warm_end[r.seed][1])] if r.seed in warm_end else [] for r in runs]
        steps, rows = _aligned([s + r.evals for s, r in zip(start, runs)])
        if steps:
            _band(ppl_ax, steps, rows, col[m], label, marker="o")
        for step in sorted({s for r in runs for s in r.restarts}):
            merges.setdefault(step, []).append(m)
    # One dotted line per merge step, in the method's colour, or dark grey where several merge at once.
    labelled = set()
    for step, ms in sorted(merges.items()):
        key = tuple(ms)
        colour = col[ms[0]] if len(ms) == 1 else "#333333"
        label = None if key in labelled else f"merge + restart ({', '.join(method_label(m) for m in ms)})"
        labelled.add(key)
        for ax in (loss_ax, ppl_ax):
            ax.axvline(step, color=colour, ls=":", lw=1.2, alpha=0.9, label=label if ax is loss_ax else None)
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
    """Grouped bars: per module type, per method the mean over seeds of the count of singular values
    > threshold of dW (each run: mean over layers); whiskers: min-max over seeds."""
    from matplotlib.figure import Figure

    methods = [m for m, s in summaries.items() if s.sv_counts]
    if not methods:
        raise ValueError("no run has singular value counts to plot")
    col = colours(list(summaries))
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
    head += ["paper (Table 3)"] if paper else []
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


def _clean(obj):
    """JSON-safe: seed keys as strings, inf as null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_comparison(results: Sequence[RunResult], out_dir: str | Path, *, recipe: str, methods: Sequence[str],
                     seeds: Sequence[int], paper: Optional[str] = None, warm: Sequence[RunResult] = (),
                     missing: Sequence[str] = (), threshold: float = 0.1, description: str = "") -> dict[str, Path]:
    """report.md, results.json, figure4.png and figure5.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    present = [m for m in methods if any(r.method == m for r in results)]
    if not present:
        raise ValueError("no finished run to report on")
    summaries = {m: summarize(results, m, paper) for m in present}
    v = verdict(summaries, results)
    paths = {"report": out / "report.md", "results": out / "results.json"}
    paths["figure4"] = plot_figure4(results, present, out / "figure4.png", warm)
    paths["figure5"] = plot_figure5(summaries, out / "figure5.png", threshold)

    notes = [f"run {r.method}-seed{r.seed} is labelled {method_label(r.method)} but its config.yaml says "
             f"{r.config_method}" for r in results
             if r.method in PAPER_METHODS and r.config_method and r.config_method != method_label(r.method)]
    text = [f"# Reproduction of the MoRA paper's pretraining comparison: recipe `{recipe}`\n"]
    if description:
        text.append(description + "\n")
    text.append(f"Seeds {', '.join(map(str, seeds))}; methods {', '.join(method_label(m) for m in methods)}; "
                f"{len(results)} finished runs"
                + (f" (a full-rank warm start of {warm[0].step} steps per seed first)" if warm else "")
                + ". Same seed = same base weights and data order, so methods are compared paired by seed.\n")
    if missing:
        text.append(f"Not finished (left out): {', '.join(missing)}.\n")
    text += [
        "## Table 3: C4 validation perplexity\n",
        table3_markdown(summaries, seeds),
        "Each run's final eval (its last record in metrics.jsonl; `tools/eval_ppl.py RUN` recomputes it from "
        "the checkpoint): exp of the token-weighted mean cross-entropy over the eval tokens shown. sd is the "
        "sample standard deviation over seeds."
        + (f" Paper: Table 3 of the MoRA paper, {paper} model (10k steps, no warm start)." if paper else "") + "\n",
        "## Figure 4: training loss and validation perplexity\n",
        "![Figure 4](figure4.png)\n",
        f"Left: training loss, smoothed per run with a centred moving average over {SMOOTH_FRACTION:.0%} of its "
        "logged steps (at least 3), then averaged over seeds (band: min-max over seeds)"
        + ("; dotted lines: ReLoRA / ReMoRA merges" if any(r.restarts for r in results) else "")
        + ". Right: the eval records (log scale)." + (" Grey, at negative steps: the full-rank warm start every "
                                                          "method starts from at step 0." if warm else "") + "\n",
        f"## Figure 5: singular values > {threshold:g} of dW = W_final - W_init\n",
        "![Figure 5](figure5.png)\n",
        f"Per module type, the mean over layers of the number of singular values > {threshold:g} of dW "
        "(`tools/count_singular_values.py RUN`); W_init is the seeded initialisation"
        + (", or the warm start's weights for warm-started runs" if warm else "")
        + ". Cells: mean over seeds (min-max).\n",
        module_table(summaries, "sv_counts"),
        "Numerical rank of dW (mean over layers; singular values above max(m, n) * eps(fp32) * sigma_max):\n",
        module_table(summaries, "ranks"),
        "## Verdict\n",
        "**Perplexity.** " + v.ppl_lines[0] + "\n",
        "".join(f"- {line}\n" for line in v.ppl_lines[1:]),
        "**Singular values.** " + v.sv_lines[0] + "\n",
        "".join(f"- {line}\n" for line in v.sv_lines[1:]),
    ]
    if notes:
        text.append("".join(f"Note: {n}.\n" for n in notes))
    paths["report"].write_text("\n".join(text))

    runs = [{k: val for k, val in asdict(r).items() if k not in ("train", "evals")} for r in results]
    data = {"recipe": recipe, "paper": paper, "seeds": list(seeds), "methods": list(methods), "threshold": threshold,
            "missing": list(missing), "summary": {m: asdict(s) for m, s in summaries.items()},
            "paired": [asdict(p) for p in v.pairs],
            "verdict": {"perplexity_agrees": v.ppl_agrees, "perplexity": v.ppl_lines,
                        "singular_values_agree": v.sv_agrees, "singular_values": v.sv_lines},
            "runs": runs, "warm_starts": [{k: val for k, val in asdict(r).items() if k not in ("train", "evals")}
                                          for r in warm]}
    paths["results"].write_text(json.dumps(_clean(data), indent=2) + "\n")
    return paths
