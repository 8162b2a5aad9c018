"""The registry of quantities: which quantity packages are known, and their read and capture halves, found by name.

It names packages by string and imports them on use, so the modules that list tables, sections, rules or
remedies (the run schema, the findings, the report, the capture settings) depend on no quantity package.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from types import ModuleType
from typing import Any

QUANTITIES: list[str] = [
    "gates",  # gate statistics: share, entropy, polarization, load ... per gate and window
    "losses",  # per-task losses per window
    "conflict",  # gradient conflict between tasks on the shared parameters
    "conflict_proxy",  # conflict proxy per expert: gate weight x gradient at each task's tower input, every step
    "guard",  # opt-in online guard: gate dropout when polarization / collapse is found at a flush
    "routers",  # sparse routers: dispatch load, MaxVio, margin, dropped tokens, expert bias per layer
    "similarity",  # linear CKA and mean-output cosine between the experts of each gate
    "seesaw",  # one task's validation metric improving while another's worsens (reads the eval table)
]


def register(package: str) -> None:
    """Add the quantity package ``package`` (a dotted path holding ``capture.py`` and ``read.py``)."""
    import_module(f"{package}.read")  # fail now, with the import error, rather than at the first flush
    if package not in QUANTITIES:
        QUANTITIES.append(package)


def _module(name: str, half: str) -> ModuleType:
    return import_module(f"{name if '.' in name else f'gatewatch.quantities.{name}'}.{half}")


def read_halves() -> list[ModuleType]:
    """The read half of every registered quantity, in registration order (no torch)."""
    return [_module(name, "read") for name in QUANTITIES]


def capture_halves() -> list[ModuleType]:
    """The capture half of every registered quantity, in registration order (imports torch)."""
    return [_module(name, "capture") for name in QUANTITIES]


class Gathered(Mapping[str, Any]):
    """The union of one dict (``TABLES``, ``SECTIONS``, ``REMEDIES``) over the read halves, kept up to date with
    the registry."""

    def __init__(self, attribute: str, first: Mapping[str, Any] | None = None, last: Mapping[str, Any] | None = None
                 ) -> None:
        self.attribute, self.first, self.last = attribute, dict(first or {}), dict(last or {})
        self._cache: tuple[tuple[str, ...], dict[str, Any]] | None = None

    def _items(self) -> dict[str, Any]:
        key = tuple(QUANTITIES)
        if self._cache is None or self._cache[0] != key:
            merged = dict(self.first)
            for half in read_halves():
                merged.update(getattr(half, self.attribute))
            self._cache = (key, {**merged, **self.last})
        return self._cache[1]

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"Gathered({self.attribute}: {list(self._items())})"
