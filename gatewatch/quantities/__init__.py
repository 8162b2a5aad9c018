"""The quantities that ship with gatewatch. Each is one package that owns one measurement end to end:

* ``capture.py`` (torch): its hooks, its device state (each tensor declared with its reduction) and the
  rows it makes of a window's host copy - see :class:`gatewatch.capture.quantity.Quantity`;
* ``read.py`` (pandas only): ``QUANTITY = ReadHalf(...)`` (:mod:`gatewatch.declarations`): its tables, which of
  them are windowed, its scalars for TensorBoard and the trackers, its report sections and their text, its rules
  and remedy texts, its dashboard pages and figures.

Adding a quantity is its package plus its registration: a line in ``QUANTITIES`` (:mod:`gatewatch.registry`) for
a package of gatewatch, an entry point in the ``gatewatch.quantities`` group for an installed package of your own,
or ``gatewatch.quantities.register("my_pkg.my_quantity")`` in one process (docs/quantities.md).
"""

from __future__ import annotations

from ..registry import register

__all__ = ["register"]
