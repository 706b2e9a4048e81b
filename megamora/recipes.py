"""Recipes: what `tools/reproduce.py` runs. A recipe names a base config, one small delta file per
method, and whether the methods start from a full-rank warm start.

    # configs/recipes/cpu.yaml
    description: "..."
    base: [../cpu/base.yaml]          # config files, relative to this recipe file
    warm_start_steps: 200             # 0: methods start from random weights (MoRA's Table 3)
    methods: {full: ../cpu/full.yaml, lora: ../cpu/lora.yaml, ...}   # the default rows, in order
    extra_methods: {mora-type6: ../cpu/mora-type6.yaml}              # rows picked with --methods
    paper: null                       # or 250m / 1b (MoRA's Table 3), galore-60m ... (megamora.paper_numbers)
    noise_floor: {perplexity: 0.01, singular_values: 0.02, measured: "how"}   # optional (megamora.noise)

A method's config is base + its delta file(s) (later files win, `megamora.config.load_config`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "configs" / "recipes"

WARM_START = "warmstart"  # run name prefix of the full-rank warm starts
# The warm start's own LR warm-up, as a fraction of its steps (the paper's 1000 of 10k).
WARM_START_WARMUP = 0.1

_KEYS = {"description", "base", "warm_start_steps", "warm_start_overrides", "methods", "extra_methods", "paper",
         "noise_floor"}


class RecipeError(ValueError):
    """A recipe that does not exist or does not load; one line."""


@dataclass
class Recipe:
    name: str
    path: Path
    description: str
    base: list[Path]
    warm_start_steps: int = 0  # N > 0: per seed a full-rank run of N steps, each method warm-started from it
    methods: dict[str, list[Path]] = field(default_factory=dict)  # default rows, in order
    extra_methods: dict[str, list[Path]] = field(default_factory=dict)
    paper: Optional[str] = None
    # Overrides of the warm-start run only (after steps= and its 10% warm-up), e.g. optim.lr=...
    warm_start_overrides: list[str] = field(default_factory=list)
    # The floor its verdict judges differences against where no noise runs are given: relative
    # perplexity and singular-value differences of same-seed runs, and how they were measured.
    noise_floor: Optional[dict] = None

    @property
    def all_methods(self) -> dict[str, list[Path]]:
        return {**self.methods, **self.extra_methods}

    def method_files(self, method: str) -> list[Path]:
        return [*self.base, *self.all_methods[method]]

    def warm_start_files(self) -> list[Path]:
        """The warm start is the recipe's full-rank row stopped early."""
        return self.method_files("full")

    def files(self) -> list[Path]:
        """Every config file the recipe names, once each."""
        seen: dict[Path, None] = {}
        for f in [*self.base, *(p for files in self.all_methods.values() for p in files)]:
            seen.setdefault(f, None)
        return list(seen)

    def content_hash(self) -> str:
        """sha256 of the recipe file and every config file it names (their bytes, in order)."""
        h = hashlib.sha256(self.path.read_bytes())
        for f in self.files():
            h.update(str(f.name).encode() + b"\0" + f.read_bytes())
        return h.hexdigest()


def recipe_names(directory: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def find_recipe(spec: str, directory: Path = RECIPES_DIR) -> Path:
    """A recipe name under configs/recipes/ (`cpu`) or a path to a recipe file."""
    by_name = directory / f"{spec}.yaml"
    if "/" not in spec and not spec.endswith((".yaml", ".yml")) and by_name.is_file():
        return by_name
    path = Path(spec)
    if path.is_file():
        return path
    names = ", ".join(recipe_names(directory)) or "none"
    raise RecipeError(f"recipe {spec!r} not found: neither a file nor one of {names} (in {directory})")


def _files(value, where: str, root: Path) -> list[Path]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise RecipeError(f"{where} must be a config file or a list of them, got {value!r}")
    paths = [(root / i).resolve() for i in items]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise RecipeError(f"{where}: config file not found: {missing[0]}")
    return paths


def _method_table(value, where: str, root: Path) -> dict[str, list[Path]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must map method names to config files, got {value!r}")
    out = {}
    for name, files in value.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith(WARM_START) or name != name.strip():
            raise RecipeError(f"{where}: {name!r} is not a usable method name (a word, not {WARM_START!r})")
        out[name] = _files(files, f"{where}.{name}", root)
    return out


def load_recipe(spec: str | Path, directory: Path = RECIPES_DIR) -> Recipe:
    """Load and check a recipe: known keys, files that exist, a full row when it warm-starts."""
    path = find_recipe(str(spec), directory).resolve()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of {sorted(_KEYS)}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(_KEYS))}")
    root = path.parent
    steps = raw.get("warm_start_steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise RecipeError(f"{path}: warm_start_steps={steps!r} must be an integer >= 0")
    methods = _method_table(raw.get("methods"), f"{path.name}: methods", root)
    extra = _method_table(raw.get("extra_methods"), f"{path.name}: extra_methods", root)
    if not methods:
        raise RecipeError(f"{path}: no methods")
    both = sorted(set(methods) & set(extra))
    if both:
        raise RecipeError(f"{path}: method {both[0]!r} is in both methods and extra_methods")
    if steps and "full" not in {**methods, **extra}:
        raise RecipeError(f"{path}: warm_start_steps={steps} needs a 'full' method (the warm start is its config)")
    paper = raw.get("paper")
    from megamora.paper_numbers import PAPER_TABLES

    if paper is not None and paper not in PAPER_TABLES:
        raise RecipeError(f"{path}: paper={paper!r} is not one of {sorted(PAPER_TABLES)} (or null)")
    noise = raw.get("noise_floor")
    if noise is not None and not (
            isinstance(noise, dict) and set(noise) <= {"perplexity", "singular_values", "measured"}
            and all(isinstance(noise.get(k, 0.0), (int, float)) and 0 <= noise.get(k, 0.0) < 1
                    for k in ("perplexity", "singular_values")) and "perplexity" in noise):
        raise RecipeError(f"{path}: noise_floor={noise!r} must map perplexity (and singular_values) to relative "
                          "differences in [0, 1), with `measured`: how")
    ws_over = raw.get("warm_start_overrides") or []
    if not isinstance(ws_over, list) or not all(isinstance(o, str) and "=" in o for o in ws_over):
        raise RecipeError(f"{path}: warm_start_overrides must be a list of key=value strings")
    return Recipe(name=path.stem, path=path, description=str(raw.get("description") or "").strip(),
                  base=_files(raw.get("base"), f"{path.name}: base", root), warm_start_steps=steps,
                  methods=methods, extra_methods=extra, paper=paper, warm_start_overrides=list(ws_over),
                  noise_floor=noise)

