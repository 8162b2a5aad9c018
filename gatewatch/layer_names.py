"""Many layer names said briefly: ``model.layers.{0..47}.mlp.gate`` for 48 routers, and a short label per layer.

Names that differ only in their numbers are grouped by what is left (each number replaced by ``#``); within a
group, the one position whose number varies is written as ranges (``{0..3,5,7..47}``). Groups are joined by
``; ``. No name is dropped: the pattern expands back to exactly the names given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER = re.compile(r"\d+")


def number_ranges(numbers: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 5, 7, 8]`` -> ``"0..3,5,7..8"`` (sorted, each run of consecutive numbers as ``a..b``)."""
    values = sorted(set(numbers))
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _groups(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_NUMBER.sub("#", name), []).append(name)
    return list(groups.items())


def name_pattern(names: Sequence[str]) -> str:
    """The names as patterns: ``["m.layers.0.gate", "m.layers.1.gate"]`` -> ``"m.layers.{0..1}.gate"``."""
    out = []
    for template, members in _groups(names):
        numbers = [[int(n) for n in _NUMBER.findall(m)] for m in members]
        varying = [i for i in range(len(numbers[0])) if len({row[i] for row in numbers}) > 1]
        if len(members) == 1 or len(varying) != 1:
            out.extend(members)
            continue
        position, pieces = varying[0], template.split("#")
        fixed = numbers[0]
        text = pieces[0]
        for i, piece in enumerate(pieces[1:]):
            text += ("{" + number_ranges([row[i] for row in numbers]) + "}" if i == position else str(fixed[i])) + piece
        out.append(text)
    return "; ".join(out)


def short_names(names: Sequence[str]) -> dict[str, str]:
    """A short label per name: the varying number when the names form one pattern (``"12"``), else the name."""
    groups = _groups(names)
    if len(groups) != 1 or len(names) < 2:
        return {n: n for n in names}
    numbers = [_NUMBER.findall(n) for n in names]
    varying = [i for i in range(len(numbers[0])) if len({row[i] for row in numbers}) > 1]
    if len(varying) != 1:
        return {n: n for n in names}
    return {n: row[varying[0]] for n, row in zip(names, numbers, strict=True)}


__all__ = ["name_pattern", "number_ranges", "short_names"]
