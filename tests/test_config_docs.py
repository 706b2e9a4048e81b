"""docs/configuration.md's field tables name exactly the fields of megamora/config.py, with their defaults.

The meanings are written by hand (a field's meaning needs a sentence, which the dataclass does not
carry); what can drift mechanically is checked here: the set of dotted field names both ways, and each
row's default against the dataclass default (the row's text read as YAML, as a config file would be).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from megamora.config import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
ROW = re.compile(r"^\|\s*`([a-z_][a-z0-9_.]*)`\s*\|\s*(.+?)\s*\|.*\|\s*$")


def config_defaults(cls=TrainConfig, prefix: str = "") -> dict[str, object]:
    """Dotted field name -> default, the nested sections flattened (`parallel.engine` -> "fsdp2")."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = f.default
        if dataclasses.is_dataclass(value):
            out.update(config_defaults(type(value), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def documented_defaults(text: str) -> dict[str, str]:
    """Dotted field name -> its default column, from the tables under `## Every field`."""
    section = text.split("\n## Every field", 1)[1]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"docs/configuration.md documents {m.group(1)} twice"
            rows[m.group(1)] = m.group(2)
    return rows


def parse_default(cell: str) -> object:
    if cell == "required":
        return MISSING
    text = cell.strip("`")
    return OmegaConf.to_container(OmegaConf.create(f"v: {text}"))["v"]


def same_default(documented: object, actual: object) -> bool:
    if isinstance(actual, list):
        return isinstance(documented, list) and [str(v) for v in documented] == [str(v) for v in actual]
    if isinstance(actual, str) and not isinstance(documented, str):
        return str(documented) == actual  # mora_type "1" reads as the YAML int 1
    if isinstance(actual, float):
        return isinstance(documented, (int, float)) and not isinstance(documented, bool) and documented == actual
    return type(documented) is type(actual) and documented == actual


def test_every_field_documented_and_nothing_else():
    actual = config_defaults()
    documented = documented_defaults(DOC.read_text())
    missing = sorted(set(actual) - set(documented))
    stale = sorted(set(documented) - set(actual))
    assert not missing, f"fields of megamora/config.py without a row in docs/configuration.md: {missing}"
    assert not stale, f"rows of docs/configuration.md naming no field of megamora/config.py: {stale}"


def test_documented_defaults_match_config():
    actual = config_defaults()
    documented = documented_defaults(DOC.read_text())
    wrong = [f"{k}: docs {documented[k]} vs config.py {actual[k]!r}" for k in sorted(set(actual) & set(documented))
             if not same_default(parse_default(documented[k]), actual[k])]
    assert not wrong, "docs/configuration.md defaults differ from megamora/config.py:\n" + "\n".join(wrong)


def test_the_checks_catch_drift():
    """The parsers see a missing row, an extra row and a wrong default (so the tests above can fail)."""
    text = DOC.read_text()
    rows = documented_defaults(text)
    assert len(rows) == len(config_defaults()) and "parallel.engine" in rows
    dropped = documented_defaults(text.replace("| `seed` | `0` |", "| seed | `0` |"))
    assert "seed" not in dropped
    assert not same_default(parse_default("`5e-3`"), 5e-4)
    assert same_default(parse_default("`5e-4`"), 5e-4) and same_default(parse_default("`1_000_000`"), 1_000_000)
    assert not same_default(parse_default("`true`"), False) and not same_default(parse_default("`1`"), 1.5)
    assert parse_default("required") is MISSING
