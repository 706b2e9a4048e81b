"""Published numbers that reports put beside their results; a recipe's `paper:` key names a table.

Each table is C4 validation perplexity by the method labels of megamora.methods:
- MoRA (Jiang et al. 2024) Table 3, after 10k steps, no warm start: keys 250m and 1b.
- GaLore (Zhao et al. 2024) Table 2, LLaMA 60M-1B: keys galore-60m ... galore-1b (LoRA and ReLoRA
  as GaLore ran them; its "Low-Rank" row, a factorised model, has no counterpart here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PaperTable:
    title: str  # how the report cites it
    perplexity: dict[str, float]


PAPER_TABLES: dict[str, PaperTable] = {
    "250m": PaperTable("Table 3 of the MoRA paper, 250m model (10k steps, no warm start)",
                       {"LoRA": 33.40, "MoRA": 28.54, "ReLoRA": 32.19, "ReMoRA": 26.74}),
    "1b": PaperTable("Table 3 of the MoRA paper, 1b model (10k steps, no warm start)",
                     {"LoRA": 28.56, "MoRA": 25.25, "ReLoRA": 27.80, "ReMoRA": 23.34}),
    "galore-60m": PaperTable("Table 2 of the GaLore paper, 60M model",
                             {"Full-rank": 34.06, "GaLore": 34.88, "LoRA": 34.99, "ReLoRA": 37.04}),
    "galore-130m": PaperTable("Table 2 of the GaLore paper, 130M model",
                              {"Full-rank": 25.08, "GaLore": 25.36, "LoRA": 33.92, "ReLoRA": 29.37}),
    "galore-350m": PaperTable("Table 2 of the GaLore paper, 350M model",
                              {"Full-rank": 18.80, "GaLore": 18.95, "LoRA": 25.58, "ReLoRA": 29.08}),
    "galore-1b": PaperTable("Table 2 of the GaLore paper, 1B model",
                            {"Full-rank": 15.56, "GaLore": 15.64, "LoRA": 19.21, "ReLoRA": 18.33}),
}
# MoRA's Table 3 alone: the presets a report over named runs fills the paper column for.
PAPER_TABLE3 = {key: PAPER_TABLES[key].perplexity for key in ("250m", "1b")}


def paper_perplexity(label: str, table: Optional[str]) -> Optional[float]:
    """The published perplexity of the method labelled `label` in table `table` (None: not there)."""
    entry = PAPER_TABLES.get(table or "")
    return entry.perplexity.get(label) if entry else None
