"""Published numbers that recipes put beside their results (a recipe's `paper:` key names a table).

GALORE_TABLE2: GaLore (Zhao et al. 2024) Table 2, validation perplexity of LLaMA pretrained on C4 at
60M / 130M / 350M / 1B, by the method labels of megamora.methods (LoRA and ReLoRA as GaLore ran
them; its "Low-Rank" row, a factorised model, has no counterpart here). MoRA's Table 3 numbers stay
in megamora.report.PAPER_TABLE3 (keys 250m, 1b).
"""

from __future__ import annotations

GALORE_TABLE2: dict[str, dict[str, float]] = {
    "galore-60m": {"Full-rank": 34.06, "GaLore": 34.88, "LoRA": 34.99, "ReLoRA": 37.04},
    "galore-130m": {"Full-rank": 25.08, "GaLore": 25.36, "LoRA": 33.92, "ReLoRA": 29.37},
    "galore-350m": {"Full-rank": 18.80, "GaLore": 18.95, "LoRA": 25.58, "ReLoRA": 29.08},
    "galore-1b": {"Full-rank": 15.56, "GaLore": 15.64, "LoRA": 19.21, "ReLoRA": 18.33},
}


def paper_number(table: str | None, method: str) -> float | None:
    """The published perplexity of `method` (a megamora.methods label) in recipe table `table`."""
    return GALORE_TABLE2.get(table or "", {}).get(method)
