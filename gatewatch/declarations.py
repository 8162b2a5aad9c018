"""What a quantity's read half declares about itself: ``QUANTITY = ReadHalf(...)`` in its ``read.py``.

Everything on the reading side iterates these declarations through :mod:`gatewatch.registry`: the run schema
(``tables``), TensorBoard's thinning and the report's coverage (``windowed``, ``measured``), the scalars of
TensorBoard and the trackers (``scalars``), the report JSON and its text form (``sections``), the findings
(``rules``, ``remedy_texts``), the dashboard (``pages``, ``panels``) and the ``gatewatch.figures`` namespace
(``figures``). Pages, panels and figure modules are named by dotted path, so a read half imports no part of
the dashboard. See docs/quantities.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from .loaded_run import Run
    from .rules import Finding, Thresholds

Add = Callable[[str, Any, Any], None]  # add(tag, value, step): one scalar; None and NaN values are left out
Scalars = Callable[[Mapping[str, pd.DataFrame], Add], None]  # one flush's tables -> add(...) per scalar
Rule = Callable[["Run", "Thresholds"], "list[Finding]"]
Build = Callable[["Run", "Thresholds"], Any]  # one key of the report JSON
Text = Callable[[Any, "dict[str, Any]"], "list[str]"]  # (the section's value, the whole report) -> terminal lines
Skipped = Callable[["Run"], "list[dict[str, Any]]"]  # the views this quantity could not compute (gatewatch.skipped)

PER_EXPERT_LIMIT = 256  # per-expert scalar tags only while gates x experts <= this (48 x 128 would be 6,144 series)


@dataclass(frozen=True)
class Section:
    """One key of the report JSON, built by ``build(run, thresholds)``; ``text`` gives its lines in the text
    report (None: not shown there). ``extends=True`` replaces the section of the same key that a quantity
    registered before declared (its ``build`` calls that one's and adds to it; it keeps that one's place and,
    when it has no ``text`` of its own, that one's text). Two sections of one key without ``extends`` are an
    error."""

    key: str
    build: Build
    text: Text | None = None
    extends: bool = False


@dataclass(frozen=True)
class Page:
    """A dashboard page: ``script`` is the dotted name of the Streamlit script that draws it (found, not
    imported, by the dashboard), ``order`` its place in the sidebar (the Runs page is 0, Overview 10, Compare 90,
    Ablations 100). ``example`` is the query string that opens it on a run of ``sample_runs/`` and ``charts`` the
    charts it draws there (the browser test opens every page so)."""

    name: str
    title: str
    icon: str
    script: str
    order: int = 50
    example: str = ""
    charts: int = 0


@dataclass(frozen=True)
class Panel:
    """What a quantity adds to a page of another quantity: ``draw`` is ``"module:function"``, called as
    ``function(ctx, run)`` at the end of page ``page`` (``ctx``: :class:`gatewatch.app.ui.Context`)."""

    page: str
    draw: str


@dataclass(frozen=True)
class ReadHalf:
    """Everything a quantity's read half declares.

    * ``tables``: its tables, each column and its type (``gatewatch.schema``);
    * ``windowed``: those of its tables with one row set per statistics window (TensorBoard keeps at most
      ``max_windows`` windows of them per flush; the report's coverage counts their steps);
    * ``measured``: those measured at steps of their own (e.g. every ``conflict_every`` steps): the report's
      coverage counts their steps, TensorBoard keeps them all;
    * ``scalars``: ``scalars(tables, add)`` calls ``add(tag, value, step)`` for each scalar of one flush that
      TensorBoard and the trackers chart (tags ``<quantity>/...``; see :mod:`gatewatch.sinks.scalars`);
    * ``sections``: its keys of the report JSON and their text; ``rules``: its finding rules;
      ``remedy_texts``: the remedy text of each finding code (the nn.Modules that implement remedies are in
      :mod:`gatewatch.remedies`);
    * ``pages``, ``panels``: its dashboard pages, and what it adds to other quantities' pages;
    * ``figures``: modules whose public functions join the ``gatewatch.figures`` namespace;
    * ``skipped``: ``skipped(run)``, the views of this quantity a run could not compute, each with the reason and
      what to pass (the report's ``skipped`` list, :mod:`gatewatch.skipped`).
    """

    tables: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    windowed: tuple[str, ...] = ()
    measured: tuple[str, ...] = ()
    scalars: Scalars | None = None
    sections: tuple[Section, ...] = ()
    rules: tuple[Rule, ...] = ()
    remedy_texts: Mapping[str, str] = field(default_factory=dict)
    pages: tuple[Page, ...] = ()
    panels: tuple[Panel, ...] = ()
    figures: tuple[str, ...] = ()
    skipped: Skipped | None = None

    def __post_init__(self) -> None:
        unknown = sorted((set(self.windowed) | set(self.measured)) - set(self.tables))
        if unknown:
            raise ValueError(f"ReadHalf: windowed/measured name tables it does not declare: {unknown}. Add them "
                             f"to tables=, or remove them from windowed=/measured=.")


def table_rows(tables: Mapping[str, pd.DataFrame], name: str) -> Any:
    """The rows of table ``name`` of one flush as named tuples (none when the flush has no such table)."""
    df = tables.get(name)
    return () if df is None or not len(df) else df.itertuples(index=False)


def per_expert_ok(tables: Mapping[str, pd.DataFrame]) -> bool:
    """Whether this flush's gates x experts (of the ``shares`` table) is small enough for one tag per expert."""
    shares = tables.get("shares")
    if shares is None or not len(shares):
        return True
    return int(shares.drop_duplicates(["gate", "expert"]).shape[0]) <= PER_EXPERT_LIMIT


__all__ = ["PER_EXPERT_LIMIT", "Add", "Page", "Panel", "ReadHalf", "Rule", "Section", "Skipped", "per_expert_ok",
           "table_rows"]
