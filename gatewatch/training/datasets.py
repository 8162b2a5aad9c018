"""The data sets the training loop knows by name, as train / validation / test splits.

``load_dataset("synthetic", correlation=0.5, seed=1)`` or ``load_dataset("census")`` returns
:class:`Splits`. ``splits.ref`` (``{"name": ..., "kwargs": {...}}``, every argument filled in, JSON
values only) rebuilds the very same splits: ``load_ref(splits.ref)``; every generator is seeded.

* ``synthetic``: the MMoE paper's regression data (:func:`gatewatch.data.make_synthetic`); tasks
  ``t1 .. tK``. One sample of ``n_train + n_val + n_test`` rows is drawn and cut in that order.
* ``domains``: token sequences from several domains (:func:`gatewatch.data.make_domains`), for the sparse
  MoE model; x holds int64 token ids ``[N, seq_len]``; tasks ``flag`` (binary) and ``score``
  (regression); ``splits.domains[split]`` holds each row's domain index, named by ``splits.domain_names``.
* ``census``: UCI census-income (:func:`gatewatch.data.load_census`), binary tasks (``income``,
  ``marital`` by default). ``max_train`` keeps a seeded random subset of the training rows (for quick
  runs); validation and test stay whole.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..data import load_census, make_synthetic
from ..data.domains import DOMAIN_TASKS, domain_names, make_domains
from ..data.splits import SplitTensors
from ..validate import positive_int
from .metrics import check_task_types


@dataclass(frozen=True)
class Splits(SplitTensors):
    """Inputs ``[N, D]`` (float32 features or int64 token ids) and float32 targets ``[N, K]`` per split, the task
    names and their types; for data from several domains, each row's domain index per split and the domains' names."""

    tasks: list[str]
    task_types: list[str]  # "binary" | "regression", one per task
    ref: dict[str, Any] = field(default_factory=dict)  # {"name", "kwargs"}: rebuilds these splits
    domains: dict[str, Tensor] = field(default_factory=dict)  # split -> [N] int64 domain index (empty: no domains)
    domain_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_task_types(self.tasks, self.task_types)
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or y.shape != (len(x), len(self.tasks)):
                raise ValueError(
                    f"{split} split: x must be [N, D] and y [N, {len(self.tasks)}], got {list(x.shape)} and "
                    f"{list(y.shape)}."
                )


def synthetic_splits(
    *,
    correlation: float = 0.5,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    n_tasks: int = 2,
    dim: int = 100,
    n_sin: int = 10,
    scale: float = 1.0,
    noise: float = 0.01,
    seed: int = 0,
) -> Splits:
    """The MMoE paper's synthetic regression tasks with task correlation ``correlation``."""
    n_train, n_val, n_test = (positive_int(name, n, unit="samples") for name, n in
                              (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)))
    x, y = make_synthetic(n_train + n_val + n_test, correlation=correlation, n_tasks=n_tasks, dim=dim,
                          n_sin=n_sin, scale=scale, noise=noise, seed=seed)
    a, b = n_train, n_train + n_val
    return Splits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], tasks=[f"t{k + 1}" for k in range(n_tasks)],
                  task_types=["regression"] * n_tasks)


@functools.lru_cache(maxsize=1)
def _census(tasks: tuple[str, ...], cache_dir: str | None, archive: str | None, seed: int) -> Any:
    return load_census(tasks, cache_dir=cache_dir, archive=archive, seed=seed)


def census_splits(
    *,
    tasks: Sequence[str] = ("income", "marital"),
    max_train: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    archive: str | None = None,
) -> Splits:
    """UCI census-income (downloaded once, then cached); ``seed`` fixes the validation/test split and subset."""
    data = _census(tuple(tasks), cache_dir, archive, seed)
    x, y = data.x_train, data.y_train
    if max_train is not None:
        max_train = positive_int("max_train", max_train, unit="rows; None for all of them")
    if max_train is not None and max_train < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_train].sort().values
        x, y = x[keep], y[keep]
    return Splits(x, y, data.x_val, data.y_val, data.x_test, data.y_test, tasks=list(data.tasks),
                  task_types=["binary"] * len(data.tasks))


def domains_splits(
    *,
    n_train: int = 4_000,
    n_val: int = 1_000,
    n_test: int = 1_000,
    seq_len: int = 16,
    vocab: int = 64,
    n_domains: int = 3,
    seed: int = 0,
) -> Splits:
    """Token sequences from ``n_domains`` domains, tasks ``flag`` and ``score`` (see :mod:`gatewatch.data.domains`)."""
    n_train, n_val, n_test = (positive_int(name, n, unit="samples") for name, n in
                              (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)))
    data = make_domains(n_train + n_val + n_test, seq_len=seq_len, vocab=vocab, n_domains=n_domains, seed=seed)
    a, b = n_train, n_train + n_val
    x, y, d = data.tokens, data.targets, data.domain
    return Splits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], tasks=list(DOMAIN_TASKS),
                  task_types=["binary", "regression"], domains={"train": d[:a], "val": d[a:b], "test": d[b:]},
                  domain_names=domain_names(n_domains))


DATASETS: dict[str, Callable[..., Splits]] = {
    "synthetic": synthetic_splits, "census": census_splits, "domains": domains_splits,
}


def load_dataset(name: str, **kwargs: Any) -> Splits:
    """The splits of data set ``name`` (see :data:`DATASETS`); ``splits.ref`` rebuilds them."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}.")
    maker = DATASETS[name]
    try:
        bound = inspect.signature(maker).bind(**kwargs)
    except TypeError as err:
        known = [p for p in inspect.signature(maker).parameters]
        raise ValueError(f"data set {name!r} does not take {sorted(kwargs)}: {err}; its options are {known}.") from err
    bound.apply_defaults()
    return replace(maker(**bound.arguments), ref={"name": name, "kwargs": {
        k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}})


def load_ref(ref: Mapping[str, Any]) -> Splits:
    """Rebuild splits from their reference ``{"name": ..., "kwargs": {...}}`` (``Splits.ref``, model.json's "data")."""
    valid = isinstance(ref, Mapping) and isinstance(ref.get("name"), str)
    if not valid or not isinstance(ref.get("kwargs", {}), Mapping):
        raise ValueError(f"a data reference is {{'name': str, 'kwargs': {{...}}}}, got {ref!r}.")
    return load_dataset(ref["name"], **ref.get("kwargs", {}))
