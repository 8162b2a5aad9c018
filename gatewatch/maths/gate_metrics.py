"""Gate metrics from window sums, on the host (numpy): the formulas of the README's "What is measured".

:func:`~gatewatch.maths.gate_sums.window_sums` adds gate outputs up on the device into a flat state per gate
and window (:class:`Layout`); :func:`window_metrics` turns the states of many windows at once into the
published metrics. A window with no valid sample gives NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Where each sum lives in a gate's flat window state of ``size`` floats."""

    experts: int
    bins: int

    @property
    def size(self) -> int:
        return 4 * self.experts + self.bins + 6

    @staticmethod
    def experts_in(size: int, bins: int) -> int:
        """The expert count of a state of ``size`` floats (the inverse of :attr:`size`)."""
        return (size - bins - 6) // 4

    def slices(self) -> dict[str, slice]:
        e, b = self.experts, self.bins
        names = [
            ("n", 1), ("sum_p", e), ("sum_p2", e), ("sum_h", 1), ("sum_max", 1), ("n_polarized", 1),
            ("top1", e), ("selected", e), ("n_small_margin", 1), ("hist", b), ("n_bad", 1),
        ]
        out, start = {}, 0
        for name, width in names:
            out[name] = slice(start, start + width)
            start += width
        return out


def entropy_nats(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats along the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def js_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (so it lies in [0, 1]) along the last axis."""
    m = (p + q) / 2
    return (entropy_nats(m) - (entropy_nats(p) + entropy_nats(q)) / 2) / math.log(2)


def drift_bits(share: np.ndarray, valid: np.ndarray, prev: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Drift of the windows' mean gates ``share [W, E]``: the JS divergence in bits of each window that had samples
    (``valid``) from the last one before it that had some (``prev``: the last of earlier flushes, or None); NaN for the
    others. Also returns the last window with samples (``prev`` if none), for the next flush."""
    drift = np.full(len(share), np.nan)
    seen = share[valid]
    before = seen[:-1] if prev is None else np.concatenate([prev[None], seen[:-1]])
    if len(before):
        drift[np.flatnonzero(valid)[len(seen) - len(before):]] = js_bits(before, seen[len(seen) - len(before):])
    return drift, (seen[-1] if len(seen) else prev)


def window_metrics(sums: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Metrics of the windows ``sums [W, layout.size]`` (or one window, ``[layout.size]``).

    Scalars come back as ``[W]`` arrays (0-d for one window), per-expert values as ``[W, E]``.
    """
    one = sums.ndim == 1
    s = np.atleast_2d(np.asarray(sums, dtype=np.float64))
    part = {k: s[:, v] for k, v in layout.slices().items()}
    e = layout.experts
    n = part["n"][:, 0]
    ok = n > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(ok, n, np.nan)[:, None]
        share = part["sum_p"] / d
        std = np.sqrt(np.clip(part["sum_p2"] / d - share**2, 0, None))
        mean_h = part["sum_h"][:, 0] / d[:, 0]
        h_of_mean = entropy_nats(np.clip(share, 0, None))
        h_of_mean = np.where(ok, h_of_mean, np.nan)
        scale = math.log(e) if e > 1 else math.inf
        out = {
            "samples": np.where(ok, n, 0.0), "share": share, "std": std, "top1": part["top1"] / d,
            "selected": part["selected"] / d,
            "entropy": np.where(ok, mean_h / scale, np.nan) if e > 1 else np.where(ok, 0.0, np.nan),
            "entropy_of_mean": np.where(ok, h_of_mean / scale, np.nan) if e > 1 else np.where(ok, 0.0, np.nan),
            "mutual_info": (np.where(ok, np.clip(h_of_mean - mean_h, 0, None) / scale, np.nan) if e > 1
                            else np.where(ok, 0.0, np.nan)),
            "effective_experts": np.exp(h_of_mean), "polarization": part["n_polarized"][:, 0] / d[:, 0],
            "max_weight": part["sum_max"][:, 0] / d[:, 0], "spread": std.mean(1),
            "small_margin": part["n_small_margin"][:, 0] / d[:, 0], "hist": part["hist"].copy(),
            "nonfinite": part["n_bad"][:, 0].copy(),
        }
    return {k: v[0] for k, v in out.items()} if one else out
