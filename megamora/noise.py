"""The noise floor of a comparison: how far apart two runs of one method and one seed land when only
what should not matter changes (threads per process, the launcher, the number of processes). The
project guarantees such runs the same batches, not the same floating-point order, and a few hundred
steps at a high learning rate amplify that order into a visible difference.

A paired difference between two methods counts as a finding only when it is beyond the floor on every
seed, in the same direction ("beyond noise"); otherwise it is "within noise". The floor is the largest
same-(method, seed) difference measured (`measure`), or a recipe's recorded one (`NoiseFloor.recorded`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Mapping, Optional


@dataclass
class NoisePair:
    """One method and seed, run by the reference reproduction and by another `setting`."""
    method: str
    seed: int
    setting: str  # what the other reproduction changed, e.g. "1 thread per process"
    perplexity: tuple[float, float]  # (reference, other)
    sv_mean: Optional[tuple[float, float]] = None  # mean singular-value count over module types

    @property
    def perplexity_rel(self) -> float:
        ref, other = self.perplexity
        return abs(other - ref) / ref

    @property
    def sv_rel(self) -> Optional[float]:
        if self.sv_mean is None or not self.sv_mean[0]:
            return None
        ref, other = self.sv_mean
        return abs(other - ref) / ref


@dataclass
class NoiseFloor:
    perplexity: float  # relative: |ppl_a - ppl_b| / ppl_b of runs that should be equal
    singular_values: Optional[float]  # relative, of the mean singular-value count; None: not measured
    source: str  # "measured here" or where a recorded floor comes from
    pairs: list[NoisePair] = field(default_factory=list)

    @classmethod
    def recorded(cls, value: Mapping) -> "NoiseFloor":
        """A recipe's `noise_floor: {perplexity, singular_values, measured}`."""
        return cls(float(value["perplexity"]), value.get("singular_values"), str(value.get("measured", "")))


def measure(reference: Mapping[tuple[str, int], tuple[float, Optional[float]]],
            others: Mapping[str, Mapping[tuple[str, int], tuple[float, Optional[float]]]]) -> Optional[NoiseFloor]:
    """The floor from runs of the same (method, seed) under other settings: `reference` and each of
    `others[setting]` map (method, seed) to (perplexity, mean singular-value count or None). None
    where no pair is in both."""
    pairs = []
    for setting, runs in others.items():
        for key in sorted(runs.keys() & reference.keys()):
            (p_ref, sv_ref), (p_other, sv_other) = reference[key], runs[key]
            sv = (sv_ref, sv_other) if sv_ref is not None and sv_other is not None else None
            pairs.append(NoisePair(key[0], key[1], setting, (p_ref, p_other), sv))
    if not pairs:
        return None
    sv_rels = [p.sv_rel for p in pairs if p.sv_rel is not None]
    return NoiseFloor(max(p.perplexity_rel for p in pairs), max(sv_rels) if sv_rels else None,
                      "measured here", pairs)


def beyond(relative: Mapping[int, float], floor: float) -> bool:
    """A paired relative difference per seed is a finding when every seed's exceeds the floor, all of
    one sign."""
    values = list(relative.values())
    return bool(values) and (all(v > floor for v in values) or all(v < -floor for v in values))


def tag(relative: Mapping[int, float], floor: Optional[NoiseFloor], what: str = "perplexity") -> str:
    """What a relation's per-seed relative differences are worth: beyond noise, within it, or not judged."""
    if floor is None:
        return ""  # the report says once that nothing was judged
    value = floor.perplexity if what == "perplexity" else floor.singular_values
    if value is None:
        return f" (no {what.replace('_', '-')} noise floor measured: not judged)"
    smallest = min(abs(v) for v in relative.values())
    if beyond(relative, value):
        return f" — **beyond noise** (every seed beyond the {percent(value)} floor)"
    return f" — *within noise* (smallest seed {percent(smallest)}, floor {percent(value)})"


def percent(fraction: float) -> str:
    """A relative difference in percent, with the digits a floor well below 1% needs."""
    return f"{100 * fraction:.2f}%" if fraction < 0.1 else f"{100 * fraction:.1f}%"


def seed_spread(per_seed: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """Per method, the relative spread of its perplexity over seeds (sample sd / mean)."""
    return {m: statistics.stdev(v.values()) / statistics.fmean(v.values())
            for m, v in per_seed.items() if len(v) > 1}


def markdown(floor: NoiseFloor, labels: Mapping[str, str], spread: Mapping[str, float]) -> str:
    """The report's noise section: the floor, its pairs, and the seed spread beside it."""
    lines = []
    if floor.pairs:
        lines += [("| run | setting | perplexity (reference) | perplexity (setting) | difference | "
                   "sv mean (reference / setting) |"), "|---|---|---:|---:|---:|---:|"]
        for p in floor.pairs:
            sv = f"{p.sv_mean[0]:.1f} / {p.sv_mean[1]:.1f}" if p.sv_mean else "-"
            lines.append(f"| {labels.get(p.method, p.method)}, seed {p.seed} | {p.setting} | {p.perplexity[0]:.2f} | "
                         f"{p.perplexity[1]:.2f} | {100 * p.perplexity_rel:.2f}% | {sv} |")
        lines.append("")
    sv = (f"; singular-value counts (mean over module types) {percent(floor.singular_values)}"
          if floor.singular_values is not None else "")
    lines.append(f"**Floor**: perplexity {percent(floor.perplexity)}{sv} ({floor.source}): the largest "
                 "difference between runs of one method and seed that differ only in float order.")
    if spread:
        lo, hi = min(spread.values()), max(spread.values())
        lines.append(f"For scale, the spread over seeds (sd / mean of a row's perplexity) is "
                     f"{100 * lo:.1f}-{100 * hi:.1f}%; paired by seed, that spread cancels and the floor is the "
                     "bar a difference must clear.")
    return "\n".join(lines) + "\n"
