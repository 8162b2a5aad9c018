"""The MMoE paper's synthetic multi-task regression data with a controllable task correlation.

Following Ma et al. (KDD 2018), for a correlation ``p`` (the cosine between the task weight vectors):

- 2 tasks: orthonormal ``u1, u2`` (QR of a Gaussian matrix), ``w1 = c u1``,
  ``w2 = c (p u1 + sqrt(1 - p^2) u2)``; any ``p`` in [-1, 1].
- K > 2 tasks: orthonormal ``u0, u1, ..., uK``, ``w_k = c (sqrt(p) u0 + sqrt(1 - p) u_k)``, so every
  pair has cosine exactly ``p``; needs ``p`` in [0, 1] and ``dim >= K + 1``.
- ``x ~ N(0, I_dim)``, ``a_i, b_i ~ N(0, 1)`` for ``i = 1..n_sin``, shared by all tasks (as in the paper),
  ``y_k = w_k.x + sum_i sin(a_i w_k.x + b_i) + N(0, noise^2)``.

``c`` is ``scale``. Randomness is seeded and deterministic: four independent ``numpy`` streams spawned
from ``seed`` (weights basis, sine parameters, inputs, noise), each a legacy ``RandomState`` on
MT19937, whose output numpy keeps stable across versions. The weights therefore do not depend on
``n`` and the first rows of ``X`` do not depend on ``n`` either.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["make_synthetic", "synthetic_weights"]

_STREAMS = ("basis", "sine", "inputs", "noise")


def _streams(seed: int) -> dict[str, np.random.RandomState]:
    """Independent, reproducible random streams for each part of the generator."""
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    streams = zip(_STREAMS, children, strict=True)
    return {name: np.random.RandomState(np.random.MT19937(child)) for name, child in streams}


def _check(correlation: float, n_tasks: int, dim: int) -> None:
    if n_tasks < 2:
        raise ValueError(f"n_tasks must be >= 2, got {n_tasks}")
    low = -1.0 if n_tasks == 2 else 0.0
    if not low <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [{low}, 1] for {n_tasks} tasks, got {correlation}")
    needed = 2 if n_tasks == 2 else n_tasks + 1
    if dim < needed:
        raise ValueError(f"dim must be >= {needed} for {n_tasks} tasks, got {dim}")


def _weights(
    rng: np.random.RandomState, correlation: float, n_tasks: int, dim: int, scale: float
) -> np.ndarray:
    """Task weight vectors ``[n_tasks, dim]`` (float64) with pairwise cosine ``correlation``."""
    n_basis = 2 if n_tasks == 2 else n_tasks + 1
    basis, _ = np.linalg.qr(rng.standard_normal((dim, n_basis)))
    u = basis.T
    p = correlation
    if n_tasks == 2:
        return scale * np.stack([u[0], p * u[0] + np.sqrt(1.0 - p * p) * u[1]])
    return scale * (np.sqrt(p) * u[0] + np.sqrt(1.0 - p) * u[1:])


def synthetic_weights(
    *, correlation: float, n_tasks: int = 2, dim: int = 100, scale: float = 1.0, seed: int = 0
) -> Tensor:
    """The task weight vectors ``w_k`` ``[n_tasks, dim]`` (float64) that ``make_synthetic`` uses."""
    _check(correlation, n_tasks, dim)
    return torch.from_numpy(_weights(_streams(seed)["basis"], correlation, n_tasks, dim, scale))


def make_synthetic(
    n: int,
    *,
    correlation: float,
    n_tasks: int = 2,
    dim: int = 100,
    n_sin: int = 10,
    scale: float = 1.0,
    noise: float = 0.01,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Sample ``n`` rows: ``X`` ``[n, dim]`` float32 and ``Y`` ``[n, n_tasks]`` float32."""
    _check(correlation, n_tasks, dim)
    rng = _streams(seed)
    w = _weights(rng["basis"], correlation, n_tasks, dim, scale)
    a = rng["sine"].standard_normal(n_sin)
    b = rng["sine"].standard_normal(n_sin)
    x = rng["inputs"].standard_normal((n, dim))
    z = x @ w.T
    y = z + np.sin(z[..., None] * a + b).sum(axis=-1) + noise * rng["noise"].standard_normal((n, n_tasks))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
