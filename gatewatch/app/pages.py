"""The dashboard's pages: its own (Runs, Overview, Compare, Ablations) and those the registered quantities
declare (``ReadHalf.pages``), in sidebar order, and what quantities add to each other's pages
(``ReadHalf.panels``). No Streamlit here: the entry script and the browser test read the same list."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.util import find_spec
from typing import Any

from ..declarations import Page
from ..registry import declarations

CORE_PAGES = (
    Page("runs", "Runs", ":material/folder_open:", "gatewatch.app.views.runs", 0),
    Page("overview", "Overview", ":material/summarize:", "gatewatch.app.views.overview", 10, "?run=polarized", 1),
    Page("compare", "Compare", ":material/stacked_line_chart:", "gatewatch.app.views.compare", 90,
         "?run=healthy&compare_runs=healthy&compare_runs=polarized", 4),
    Page("ablations", "Ablations", ":material/science:", "gatewatch.app.views.ablations", 100, "?run=healthy", 0),
)


def pages() -> list[Page]:
    """Every page, in sidebar order; two pages of one name are an error."""
    found = {p.name: p for p in CORE_PAGES}
    for quantity, half in declarations():
        for page in half.pages:
            if page.name in found:
                raise ValueError(f"quantity {quantity!r} declares the dashboard page {page.name!r}, which another "
                                 "quantity or the dashboard already has. Give it another name.")
            found[page.name] = page
    return sorted(found.values(), key=lambda p: p.order)


def script(page: Page) -> str:
    """The path of a page's Streamlit script (found without importing it)."""
    spec = find_spec(page.script)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the script {page.script!r} of dashboard page {page.name!r} is not installed.")
    return spec.origin


def page_script(name: str) -> str:
    """The script path of the page called ``name``."""
    return script(next(p for p in pages() if p.name == name))


def titles() -> dict[str, str]:
    return {p.name: p.title for p in pages()}


def panels(page: str) -> list[Callable[..., Any]]:
    """What the registered quantities draw at the end of page ``page``: functions ``draw(ctx, run)``."""
    out = []
    for _, half in declarations():
        for panel in half.panels:
            if panel.page == page:
                module, _, function = panel.draw.partition(":")
                out.append(getattr(import_module(module), function))
    return out
