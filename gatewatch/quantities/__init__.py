"""The registered quantities. Each is one package that owns one measurement end to end:

* ``capture.py`` (torch): its hooks, its device state (each tensor declared with its reduction) and the
  rows it makes of a window's host copy - see :class:`gatewatch.capture.quantity.Quantity`;
* ``read.py`` (pandas only): ``TABLES`` (its tables' schema), ``SECTIONS`` (its keys of the report JSON),
  ``RULES`` (its finding rules) and ``REMEDIES`` (the remedy texts they print).

Adding a quantity is its package plus one line: below for a package of gatewatch, or
``gatewatch.quantities.register("my_pkg.my_quantity")`` for one of your own (docs/quantities.md).
Everything that lists tables, sections, rules or remedies reads them from here, on use.
"""

from __future__ import annotations

from ..registry import register

__all__ = ["register"]
