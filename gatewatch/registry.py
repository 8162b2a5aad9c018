"""The registry of quantities: which quantity packages are known, and their read and capture halves, found by name.

A quantity is known in every process that imports gatewatch when it is one of gatewatch's own (``QUANTITIES``
below), when an installed distribution names it in the entry-point group ``gatewatch.quantities`` (the value is
the package's dotted path: ``max_gate = my_pkg.max_gate``), or, in one process, after
``gatewatch.quantities.register("my_pkg.max_gate")``. The registry names packages by string and imports them
on use, so the modules that list tables, sections, rules or remedies (the run schema, the findings, the report,
the sinks, the dashboard) depend on no quantity package.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from importlib import import_module, metadata
from types import ModuleType
from typing import Any

from .declarations import ReadHalf, Section

ENTRY_POINTS = "gatewatch.quantities"

QUANTITIES: list[str] = [
    "gates",  # gate statistics: share, entropy, polarization, load ... per gate and window
    "losses",  # per-task losses per window
    "conflict",  # gradient conflict between tasks on the shared parameters
    "conflict_proxy",  # conflict proxy per expert: gate weight x gradient at each task's tower input, every step
    "guard",  # opt-in online guard: gate dropout when polarization / collapse is found at a flush
    "routers",  # sparse routers: dispatch load, MaxVio, margin, dropped tokens, expert bias per layer
    "coactivation",  # sparse routers: how often two experts are chosen by the same token, per layer and window
    "routing_stability",  # sparse routers: top-k sets of a fixed probe batch every saturation_every steps
    "similarity",  # linear CKA and mean-output cosine between the experts of each gate
    "groups",  # opt-in sample groups on a shared gate: per-group share and load, specialisation I(G;E)/H(G)
    "seesaw",  # one task's validation metric improving while another's worsens (reads the eval table)
]
BUILT_IN = frozenset(QUANTITIES)  # packages of gatewatch.quantities; any other name is a package's full path
INSTALLED: dict[str, str] = {}  # package -> the distribution whose entry point named it


def register(package: str) -> None:
    """Add the quantity package ``package`` (a dotted path holding ``capture.py`` and ``read.py``) in this
    process. A package installed with an entry point in ``gatewatch.quantities`` needs no call."""
    declaration(package)  # fail now, with the import error, rather than at the first flush
    if package not in QUANTITIES:
        QUANTITIES.append(package)


def _load_entry_points() -> None:
    """Add the packages that installed distributions name in the entry-point group ``gatewatch.quantities``."""
    try:
        found = metadata.entry_points(group=ENTRY_POINTS)
    except Exception as err:  # a broken installation must not stop gatewatch from reading runs
        warnings.warn(f"gatewatch could not list the {ENTRY_POINTS!r} entry points ({type(err).__name__}: {err}); "
                      "only the built-in quantities are known.", RuntimeWarning, stacklevel=2)
        return
    for point in sorted(found, key=lambda p: p.name):
        package = point.value.split(":", 1)[0].strip()
        if package not in QUANTITIES:
            QUANTITIES.append(package)
            INSTALLED[package] = point.dist.name if point.dist is not None else point.name


def _module(name: str, half: str) -> ModuleType:
    path = f"gatewatch.quantities.{name}.{half}" if name in BUILT_IN else f"{name}.{half}"
    try:
        return import_module(path)
    except ImportError as err:
        if name in INSTALLED and getattr(err, "name", None) and path.startswith(str(err.name)):
            raise ImportError(f"the quantity {name!r}, named by the {ENTRY_POINTS!r} entry point of the installed "
                              f"distribution {INSTALLED[name]!r}, cannot be imported ({err}). Reinstall that "
                              f"distribution, or uninstall it: pip uninstall {INSTALLED[name]}") from err
        raise


def declaration(name: str) -> ReadHalf:
    """The :class:`~gatewatch.declarations.ReadHalf` of quantity ``name`` (its ``read.QUANTITY``)."""
    module = _module(name, "read")
    declared = getattr(module, "QUANTITY", None)
    if not isinstance(declared, ReadHalf):
        raise TypeError(f"{module.__name__} declares no QUANTITY = gatewatch.declarations.ReadHalf(...) (it has "
                        f"{type(declared).__name__}): a quantity's read half declares its tables, scalars, report "
                        "sections and rules so (docs/quantities.md).")
    return declared


def declarations() -> list[tuple[str, ReadHalf]]:
    """``(name, declaration)`` of every registered quantity, in registration order (no torch)."""
    return [(name, declaration(name)) for name in QUANTITIES]


def read_halves() -> list[ModuleType]:
    """The read half of every registered quantity, in registration order (no torch)."""
    return [_module(name, "read") for name in QUANTITIES]


def capture_halves() -> list[ModuleType]:
    """The capture half of every registered quantity, in registration order (imports torch)."""
    return [_module(name, "capture") for name in QUANTITIES]


def sections() -> dict[str, Section]:
    """The report sections of every registered quantity by key, in registration order. A section with
    ``extends=True`` takes the place of the one of its key declared before it (keeping that one's text unless it
    has its own); a key declared twice otherwise is an error."""
    merged: dict[str, tuple[str, Section]] = {}
    for name, half in declarations():
        for section in half.sections:
            before = merged.get(section.key)
            if section.extends and before is None:
                raise ValueError(f"quantity {name!r}: its section {section.key!r} extends one that no quantity "
                                 f"registered before it declares. Register that quantity first, or declare the "
                                 f"section without extends=True.")
            if before is not None and not section.extends:
                raise ValueError(f"quantities {before[0]!r} and {name!r} both declare the report section "
                                 f"{section.key!r}. Rename one, or declare the later one with extends=True when it "
                                 f"builds on the other.")
            if before is not None and section.text is None:
                section = Section(section.key, section.build, before[1].text, extends=True)
            merged[section.key] = (name, section)
    return {key: section for key, (_, section) in merged.items()}


class Gathered(Mapping[str, Any]):
    """The union of one mapping field of the declarations (``tables``, ``remedy_texts``) over the registered
    quantities, kept up to date with the registry; a key declared by two quantities is an error."""

    def __init__(self, field: str, last: Mapping[str, Any] | None = None) -> None:
        self.field, self.last = field, dict(last or {})
        self._cache: tuple[tuple[str, ...], dict[str, Any]] | None = None

    def _items(self) -> dict[str, Any]:
        key = tuple(QUANTITIES)
        if self._cache is None or self._cache[0] != key:
            merged: dict[str, Any] = {}
            seen: dict[str, str] = {}
            for name, half in declarations():
                for item, value in getattr(half, self.field).items():
                    if item in seen or item in self.last:
                        raise ValueError(f"quantities {seen.get(item, 'gatewatch')!r} and {name!r} both declare "
                                         f"{item!r} in {self.field}. Rename one of them.")
                    seen[item] = name
                    merged[item] = value
            self._cache = (key, {**merged, **self.last})
        return self._cache[1]

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"Gathered({self.field}: {list(self._items())})"


_load_entry_points()
