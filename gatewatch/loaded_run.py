"""A run in memory: metadata, tidy tables and read problems (see :mod:`gatewatch.schema`).

:func:`gatewatch.load_run` builds one from a run directory; a watch builds one over its recent windows
to evaluate the finding rules while training. Pure pandas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .schema import TABLES, conform, frame


@dataclass
class Run:
    """One run directory: metadata, tidy tables (see :mod:`gatewatch.schema`) and read problems."""

    path: Path
    meta: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    status: str  # "live" | "finished" | "cut off"
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of_tables(cls, path: Path, meta: dict[str, Any], tables: Mapping[str, pd.DataFrame], status: str) -> Run:
        """A run made of rows in memory (a watch's recent windows): every table conformed to its schema, and the
        tables it lacks present and empty."""
        return cls(path=path, meta=meta, status=status,
                   tables={name: conform(name, tables[name]) if name in tables else frame(name) for name in TABLES})

    def table(self, name: str) -> pd.DataFrame:
        """One table by name (empty, with its columns, when the run has none of it). A table that no installed
        quantity declares is there as it was written, when the run has it."""
        if name in self.tables:
            return self.tables[name]
        if name not in TABLES:
            raise KeyError(f"No table {name!r}; the tables are {sorted({*TABLES, *self.tables})}.")
        return frame(name)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)

    @property
    def gates(self) -> pd.DataFrame:
        return self.table("gates")

    @property
    def shares(self) -> pd.DataFrame:
        return self.table("shares")

    @property
    def hist(self) -> pd.DataFrame:
        return self.table("hist")

    @property
    def experts(self) -> pd.DataFrame:
        return self.table("experts")

    @property
    def losses(self) -> pd.DataFrame:
        return self.table("losses")

    @property
    def events(self) -> pd.DataFrame:
        return self.table("events")

    @property
    def tasks(self) -> list[str]:
        return list(self.meta.get("tasks") or [])

    @property
    def gate_names(self) -> list[str]:
        names = [g["name"] for g in self.meta.get("gates", []) if isinstance(g, dict) and "name" in g]
        return names or sorted(self.gates["gate"].dropna().unique().tolist())

    @property
    def steps(self) -> int:
        """The last training step the run reached (from run.json, or the tables if it is older)."""
        last = [int(df["step"].max()) for df in self.tables.values() if len(df) and "step" in df]
        return max([int(self.meta.get("steps") or 0), *last])

    @property
    def error(self) -> str | None:
        return self.meta.get("error")
