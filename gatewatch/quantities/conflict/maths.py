"""Gradient-conflict maths on the device: the Gram matrices, sign disagreements and GradDrop purity of task
gradients held as rows of one flat buffer (no host synchronisation), and the pair statistics on the host.

Cosines and norms are exact. The sign statistics (opposite-sign counts, purity histograms) of a tensor with at
least :data:`SAMPLE_FROM` elements are counted on a fixed sample of :data:`SAMPLE_SIZE` of its elements, at
positions drawn uniformly without replacement once (seeded, :class:`SignSample`), and scaled back to its element
count: a share's standard error is at most 0.5 / sqrt(4096) ~ 0.008 (``tests/test_conflict_sampling.py`` bounds
it), and the cost of the sign statistics grows with the number of tensors, not with their size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PURITY_BINS = 10  # GradDrop purity histogram over [0, 1]
SAMPLE_FROM = 16_384  # a unit (tensor or group) with at least this many elements has its signs counted on a sample
SAMPLE_SIZE = 4_096  # ... of this many elements at fixed random positions (no stride to line up with a row)
SAMPLE_SEED = 0


def sampled_size(n: int) -> int:
    """How many of a unit's ``n`` elements the sign statistics count."""
    return SAMPLE_SIZE if n >= SAMPLE_FROM else n


def sample_ranges(units: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where each of ``ranges`` (which tile ``units`` end to end) lies among the sampled elements of ``units``."""
    starts, ends, at = {}, {}, 0
    for s, e in units:
        starts[s] = at
        at += sampled_size(e - s)
        ends[e] = at
    return [(starts[s], ends[e]) for s, e in ranges]


@dataclass
class UnitRuns:
    """Many units' Gram matrices and sums in few batched operations.

    Units of one size at evenly spaced starts (the same parameter of every expert or layer) form a run: one
    ``bmm`` (or one ``sum``) over a strided view of the buffer, with no copy. ``runs`` holds ``(start, size,
    spacing, count)``; ``order`` is where each unit's result lands among the runs' results, in unit order.
    """

    runs: list[tuple[int, int, int, int]]
    order: torch.Tensor

    @classmethod
    def plan(cls, units: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> UnitRuns:
        """The runs of ``units`` (``(start, end)`` ranges that do not overlap), each as long as the spacing holds."""
        by_size: dict[int, list[tuple[int, int]]] = {}
        for i, (s, e) in enumerate(units):
            by_size.setdefault(e - s, []).append((s, i))
        runs: list[tuple[int, int, int, int]] = []
        position = [0] * len(units)
        at = 0
        for size, starts in by_size.items():
            starts.sort()
            first = 0
            while first < len(starts):
                last = first + 1
                spacing = starts[last][0] - starts[first][0] if last < len(starts) else size
                while last < len(starts) and starts[last][0] - starts[last - 1][0] == spacing:
                    last += 1
                for _, unit in starts[first:last]:
                    position[unit] = at
                    at += 1
                runs.append((starts[first][0], size, spacing, last - first))
                first = last
        return cls(runs, torch.tensor(position, dtype=torch.int64, device=device))

    def grams(self, g: torch.Tensor) -> torch.Tensor:
        """``[U, K, K]``: the Gram matrix of the rows of ``g [K, M]`` (last dimension contiguous) on each unit."""
        k, row, base = g.shape[0], g.stride(0), g.storage_offset()
        parts = []
        for start, size, spacing, count in self.runs:
            x = g.as_strided((count, k, size), (spacing, row, 1), base + start)
            parts.append(torch.bmm(x, x.transpose(1, 2)))
        return torch.cat(parts).index_select(0, self.order)

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """``[U, P]``: the sum of each row of ``x [P, M]`` (last dimension contiguous) over each unit."""
        p, row, base = x.shape[0], x.stride(0), x.storage_offset()
        parts = [x.as_strided((count, p, size), (spacing, row, 1), base + start).sum(-1)
                 for start, size, spacing, count in self.runs]
        return torch.cat(parts).index_select(0, self.order)


@dataclass
class SignSample:
    """Where the sign statistics are counted: ``pieces``, how the sample is gathered from the flat buffer in order
    (``(start in the sample, length, source)``: a source start for a run of at least :data:`SAMPLE_FROM` adjacent
    elements counted whole, one copy; else the positions, on the buffer's device, one ``index_select`` per task),
    the units' and groups' ranges in the sample, the units' runs there, and a ``[stack_rows(K), m]`` working
    buffer."""

    pieces: list[tuple[int, int, int | torch.Tensor]]
    units: list[tuple[int, int]]
    groups: list[tuple[int, int]]
    runs: UnitRuns
    buffer: torch.Tensor

    @classmethod
    def plan(cls, units: Sequence[tuple[int, int]], groups: Sequence[tuple[int, int]], k: int,
             like: torch.Tensor) -> SignSample | None:
        """The sample of ``units`` (groups tile units end to end), or None when every unit is counted whole."""
        if all(sampled_size(e - s) == e - s for s, e in units):
            return None
        rng = np.random.default_rng(SAMPLE_SEED)
        runs: list[tuple[int, int, Any]] = []  # (start in the sample, length, source start | [positions])
        at = 0
        for s, e in units:
            last = runs[-1] if runs else None
            if e - s >= SAMPLE_FROM:
                runs.append((at, SAMPLE_SIZE, [s + np.sort(rng.choice(e - s, SAMPLE_SIZE, replace=False))]))
            elif last is not None and isinstance(last[2], int) and last[2] + last[1] == s:
                runs[-1] = (last[0], last[1] + e - s, last[2])  # adjacent units counted whole: one run
            else:
                runs.append((at, e - s, s))
            at += sampled_size(e - s)
        merged: list[tuple[int, int, Any]] = []
        for start, n, source in runs:  # a short run counted whole joins the positions around it: fewer ops
            if isinstance(source, int) and n < SAMPLE_FROM:
                source = [np.arange(source, source + n)]
            if merged and not isinstance(source, int) and not isinstance(merged[-1][2], int):
                merged[-1] = (merged[-1][0], merged[-1][1] + n, merged[-1][2] + source)
            else:
                merged.append((start, n, source))
        pieces = [(start, n, source if isinstance(source, int)
                   else torch.from_numpy(np.concatenate(source)).to(like.device)) for start, n, source in merged]
        sampled = sample_ranges(units, units)
        return cls(pieces, sampled, sample_ranges(units, groups), UnitRuns.plan(sampled, like.device),
                   torch.empty(stack_rows(k), at, dtype=like.dtype, device=like.device))

    def positions(self) -> torch.Tensor:
        """Where each sampled element lies in the flat buffer, in sample order."""
        return torch.cat([torch.arange(source, source + n, device=self.buffer.device) if isinstance(source, int)
                          else source for _, n, source in self.pieces])

    def gather(self, g: torch.Tensor, out: torch.Tensor) -> None:
        """The sampled elements of the rows of ``g [K, M]`` into ``out [K, m]``."""
        for start, n, source in self.pieces:
            if isinstance(source, int):
                out[:, start : start + n].copy_(g[:, source : source + n])
            else:
                for row, into in zip(g, out, strict=True):  # one row at a time: a third faster on CPU
                    torch.index_select(row, 0, source, out=into[start : start + n])


def task_pairs(k: int) -> list[tuple[int, int]]:
    """Index pairs ``(a, b)``, a < b, of K tasks in order: (0, 1), (0, 2), ..., (K-2, K-1)."""
    return [(a, b) for a in range(k) for b in range(a + 1, k)]


def stack_rows(k: int) -> int:
    """Rows of the working buffer of K tasks: their gradients, then scratch rows."""
    return k + max(2, len(task_pairs(k)))


def purity_counts(g: torch.Tensor, bounds: Sequence[tuple[int, int]], bins: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Histogram ``[U, bins + 1]`` of GradDrop's sign purity P = (1 + sum_k g_k / sum_k |g_k|) / 2 per range.

    ``g [K, M]`` are the task gradients, overwritten with their absolute values; ``scratch [2, M]`` (same
    dtype) is working space, so that a conflict step allocates nothing of size M. P = 1 (every task pushes
    the element up) lands in the last bin; elements no task touches (P undefined) are counted in the
    extra column ``bins``.
    """
    if scratch is None:
        scratch = torch.empty(2, g.shape[1], dtype=g.dtype, device=g.device)
    total, norm = _row_sum(g, scratch[0]), _row_sum(g.abs_(), scratch[1])
    half = torch.full((), bins / 2, dtype=g.dtype, device=g.device)  # a fill, not a host-to-device copy
    scaled = torch.addcdiv(half, total, norm, value=bins / 2, out=total)  # bins * P, NaN where no task has one
    scaled.clamp_(max=bins - 0.5).nan_to_num_(nan=float(bins))  # the bin is its integer part; undefined: bins
    if scaled.is_cuda:  # bincount would synchronise with the host there (it reads the largest index)
        def count(s: int, e: int) -> torch.Tensor:
            return torch.histc(scaled[s:e], bins + 1, 0, bins + 1)
    else:
        index = norm.view(torch.int32 if norm.element_size() == 4 else torch.int64)[: g.shape[1]]
        index.copy_(scaled)  # truncates to the bin; bincount is 4x faster than histc on CPU

        def count(s: int, e: int) -> torch.Tensor:
            return torch.bincount(index[s:e], minlength=bins + 1)

    counts: list[torch.Tensor | None] = [None] * len(bounds)
    for i, parts in histogram_plan(tuple(map(tuple, bounds))):
        counts[i] = count(*bounds[i]) if parts is None else torch.stack([counts[j] for j in parts]).sum(0)
    return torch.stack(counts)


@functools.lru_cache(maxsize=16)
def histogram_plan(bounds: tuple[tuple[int, int], ...]) -> list[tuple[int, list[int] | None]]:
    """In which order to histogram each range, and from what: ``(i, None)`` counts range i's elements,
    ``(i, [j, ...])`` adds up the counts of smaller ranges j that tile it end to end (e.g. "all" from the
    modules), so that an element is binned once however many ranges hold it. Smaller ranges come first. Kept per
    set of ranges (a run's ranges do not change between conflict steps; the plan is quadratic in their number)."""
    plan: list[tuple[int, list[int] | None]] = []
    for i, (s, e) in enumerate(bounds):
        inner = sorted((b, j) for j, b in enumerate(bounds) if s <= b[0] and b[1] <= e and b != (s, e))
        pos, parts = s, []
        for (a, b), j in inner:
            if a == pos:
                parts.append(j)
                pos = b
        plan.append((i, parts if pos == e and len(parts) > 1 else None))
    return sorted(plan, key=lambda item: (item[1] is not None, bounds[item[0]][1] - bounds[item[0]][0]))


def _row_sum(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``rows.sum(0)`` into ``out`` with K-1 additions (a reduction over dim 0 is slow on CPU)."""
    if len(rows) == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out.add_(row)
    return out


def task_statistics(stack: torch.Tensor, k: int, units: Sequence[tuple[int, int]],
                    groups: Sequence[tuple[int, int]], bins: int, sample: SignSample | None = None,
                    plan: UnitRuns | None = None) -> torch.Tensor:
    """Everything a conflict step logs, as one flat device tensor (no host synchronisation).

    ``stack [stack_rows(K), M]`` holds the K task gradients in its first K rows (left as their absolute
    values unless ``sample`` is given); the rest is scratch space.
    ``units`` are the element ranges that get statistics (each parameter tensor, or each group), ``groups``
    the ranges that get a purity histogram. Layout of the result: the ``[U, K, K]`` Gram matrices of the
    task gradients (all elements), the ``[U, pairs]`` counts of elements where a pair's gradients have
    opposite signs, then the ``[G, bins + 1]`` purity counts; with ``sample`` the counts are those of the
    sampled elements (:func:`sampled_size` per unit). ``plan`` is :meth:`UnitRuns.plan` of ``units`` (made here
    when not given).
    """
    g = stack[:k]
    runs = plan or UnitRuns.plan(units, stack.device)
    grams = runs.grams(g)
    work = stack
    if sample is not None:
        work, groups, runs = sample.buffer, sample.groups, sample.runs
        sample.gather(g, work[:k])
    signs = work[:k]
    pairs = task_pairs(k)
    opposite = work[k : k + len(pairs)]
    for row, (a, b) in zip(opposite, pairs, strict=True):
        torch.mul(signs[a], signs[b], out=row)
    opposite.lt_(0)  # 1 where the pair's gradients have opposite signs
    disagree = runs.sums(opposite)
    counts = purity_counts(signs, groups, bins, scratch=work[k : k + 2])
    return torch.cat([grams.flatten(), disagree.flatten(), counts.flatten().to(g.dtype)])


def pair_table(gram: np.ndarray, disagree: np.ndarray, elements: np.ndarray, a: int, b: int
               ) -> dict[str, np.ndarray]:
    """Cosine, sign conflict, norms and magnitude similarity of tasks ``a``, ``b``.

    ``gram [..., K, K]`` are Gram matrices of the task gradients, ``disagree [...]`` the pair's counts of
    elements with opposite signs, ``elements`` (broadcast against it) the element counts. A pair where a
    task has no gradient gets cosine 0 and magnitude similarity 0 with ``zero_grad`` set.
    """
    sq_a, sq_b, dot = gram[..., a, a], gram[..., b, b], gram[..., a, b]
    norm_a, norm_b = np.sqrt(sq_a), np.sqrt(sq_b)
    zero = (norm_a == 0) | (norm_b == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.where(zero, 0.0, np.clip(dot / (norm_a * norm_b), -1.0, 1.0))
        magnitude = np.where(zero, 0.0, 2 * norm_a * norm_b / (sq_a + sq_b))
    return {"cosine": cosine, "sign_conflict": disagree / np.maximum(elements, 1), "norm_a": norm_a,
            "norm_b": norm_b, "magnitude_sim": magnitude, "zero_grad": zero}
