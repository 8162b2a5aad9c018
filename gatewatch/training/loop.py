"""Train a reference model on a named data set with GateWatch attached.

``train(TrainConfig(model="mmoe", data="synthetic", steps=2000), "runs/mmoe")`` seeds everything,
builds the data (:mod:`~gatewatch.training.datasets`) and the model (:mod:`gatewatch.models`), trains
with ``watch.backward`` / ``watch.step``, evaluates on validation every ``eval_every`` steps and on
test at the end, and leaves a complete run directory. ``staleness=tau`` trains on stale gradients, as
asynchronous data-parallel workers would (:mod:`~gatewatch.training.staleness`). On a data set whose rows carry
their domain (``splits.domains``, e.g. ``data="domains"``), each batch's forward is labelled with its rows' domains
(``watch.grouped``), so the run records the sample groups' routing and specialisation (``sample_groups``). It
leaves:

* the GateWatch tables and ``run.json`` (plus an ``eval`` table: step, split, task, metric, value);
* ``metrics.json``: final validation and test metrics per task, the validation history, steps done,
  where it stopped early (``stopped_at``) and the configuration;
* ``checkpoint.pt`` + ``model.json``: the trained model and how to rebuild it (see
  :mod:`~gatewatch.training.checkpoint`).
"""

from __future__ import annotations

import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..guard import Guard
from ..models import CGC, PLE, MMoE, OMoE, SharedBottom, SparseMoE, factory_ref
from ..run_format import atomic_write_json
from ..validate import dropout_rate, non_negative_int, positive_int
from ..watch import GateWatch, quantity_keywords
from .checkpoint import save_model
from .datasets import Splits, load_dataset
from .metrics import evaluate
from .staleness import DELAYS, Staleness

MODELS: dict[str, type[nn.Module]] = {
    "mmoe": MMoE, "omoe": OMoE, "shared_bottom": SharedBottom, "cgc": CGC, "ple": PLE, "sparse_moe": SparseMoE,
}
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}
METRICS_FILE = "metrics.json"


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON values only; stored in run.json and metrics.json)."""

    model: str = "mmoe"  # a key of MODELS
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # constructor kwargs besides in_dim / tasks
    data: str = "synthetic"  # a key of gatewatch.training.datasets.DATASETS
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"  # a key of OPTIMIZERS
    seed: int = 0  # model init, batch order, gate dropout masks (the data has its own seed in data_kwargs)
    gate_dropout: float = 0.0  # GateDropout probability on every gate (0: none)
    task_weights: dict[str, float] = field(default_factory=dict)  # loss weight per task (absent: 1; 0 drops a task)
    staleness: int = 0  # apply at step t the gradient computed on the parameters of step t - delay (0: none)
    staleness_delay: str = "fixed"  # delay = staleness, or "random": uniform on 0..staleness (seeded by seed)
    every: int = 10  # GateWatch window, steps
    flush_every: int = 100  # GateWatch writes, steps
    flush_secs: float | None = 5.0  # ... or seconds since the last write, whichever first (None: steps only)
    conflict_every: int | None = None  # per-task gradient conflict, when GateWatch supports it
    similarity_every: int | None = None  # expert similarity (None: GateWatch's default, 0: off)
    saturation_every: int = 0  # routers: the routing probe every N steps (stability, saturation; 0: off)
    sample_groups: bool | None = None  # label batches with their rows' domains (None: when the data has domains)
    guard_dropout: float = 0.0  # the online guard (gw.Guard) with this gate-dropout rate (0: no guard)
    eval_every: int = 0  # validation every N steps (0: only at the end)
    tensorboard: bool = True
    watch: bool = True  # attach GateWatch (False: a plain baseline, e.g. shared_bottom, which has no gates)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "every", "flush_every"):
            positive_int(f"TrainConfig.{name}", getattr(self, name))
        if self.eval_every < 0:
            raise ValueError(f"TrainConfig.eval_every must be >= 0 (0: only at the end), got {self.eval_every}.")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(MODELS)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}.")
        dropout_rate("gate_dropout", self.gate_dropout, owner="TrainConfig")
        dropout_rate("guard_dropout", self.guard_dropout, owner="TrainConfig")
        if self.guard_dropout and not self.watch:
            raise ValueError("TrainConfig.guard_dropout needs the watch (watch=True): the guard acts on its findings.")
        non_negative_int("staleness", self.staleness, unit="steps", owner="TrainConfig")
        if self.staleness_delay not in DELAYS:
            raise ValueError(f"unknown staleness_delay {self.staleness_delay!r}; choose one of {list(DELAYS)}.")
        if self.model == "shared_bottom" and (self.gate_dropout or self.watch):
            raise ValueError("shared_bottom has no gates: train it with watch=False and gate_dropout=0.")
        for task, weight in self.task_weights.items():
            if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight < math.inf):
                raise ValueError(f"TrainConfig.task_weights[{task!r}] must be a number >= 0, got {weight!r}.")
        if self.sample_groups is not None and not isinstance(self.sample_groups, bool):
            raise ValueError(f"TrainConfig.sample_groups is True, False or None (None: when the data set has "
                             f"domains), got {self.sample_groups!r}.")
        if self.sample_groups and not self.watch:
            raise ValueError("TrainConfig.sample_groups needs the watch (watch=True): the groups are its statistics.")
        if "gate_dropout" in self.model_kwargs:
            raise ValueError("set gate dropout with TrainConfig.gate_dropout, not model_kwargs['gate_dropout'].")


@dataclass
class TrainResult:
    """Where the run was written and its final metrics (the content of metrics.json)."""

    run_dir: Path
    metrics: dict[str, Any]


ModelBuilder = Callable[[Splits, TrainConfig], nn.Module]


def build_model(splits: Splits, config: TrainConfig) -> nn.Module:
    """The reference model ``config.model`` sized for ``splits`` (in_dim, tasks) with ``config.model_kwargs``."""
    kwargs: dict[str, Any] = {"in_dim": splits.in_dim, "tasks": list(splits.tasks), **config.model_kwargs}
    if config.gate_dropout:
        kwargs["gate_dropout"] = config.gate_dropout
    try:
        return MODELS[config.model](**kwargs)
    except TypeError as err:
        raise ValueError(
            f"model {config.model!r} does not take model_kwargs {sorted(config.model_kwargs)}: {err}"
        ) from err


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weighted(losses: dict[str, Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    """Each task's loss times its weight in ``weights`` (tasks not named keep weight 1)."""
    return {t: loss * weights[t] if t in weights else loss for t, loss in losses.items()}


def task_losses(outputs: list[Tensor], y: Tensor, tasks: list[str], task_types: list[str]) -> dict[str, Tensor]:
    """BCE with logits for binary tasks, MSE for regression tasks, keyed by task."""
    return {
        t: F.binary_cross_entropy_with_logits(o, y[:, k]) if kind == "binary" else F.mse_loss(o, y[:, k])
        for k, (t, o, kind) in enumerate(zip(tasks, outputs, task_types, strict=True))
    }


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Row indices of shuffled mini-batches, epoch after epoch (the last short batch of an epoch is dropped)."""
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def supports_conflict() -> bool:
    """True when this GateWatch can log per-task gradient conflict (``conflict_every``)."""
    return "conflict_every" in quantity_keywords()


def group_names(config: TrainConfig, splits: Splits) -> list[str]:
    """The sample groups the loop labels batches with: the data set's domain names, when it has domains and
    ``config.sample_groups`` is not False; none otherwise. True on data without domains raises."""
    if config.sample_groups is False or not config.watch:
        return []
    if not splits.domain_names:
        if config.sample_groups:
            raise ValueError(f"TrainConfig.sample_groups=True needs a data set whose rows carry their domain (e.g. "
                             f"data='domains'); {config.data!r} has none. Leave sample_groups at None or False.")
        return []
    return list(splits.domain_names)


def watch_kwargs(config: TrainConfig, groups: list[str] | None = None) -> dict[str, Any]:
    """Extra GateWatch arguments: conflict_every (when this GateWatch supports it), similarity_every,
    saturation_every, the guard and the sample groups."""
    extra: dict[str, Any] = {"guard": Guard(dropout=config.guard_dropout)} if config.guard_dropout else {}
    if groups:
        extra["sample_groups"] = groups
    if config.similarity_every is not None:
        extra["similarity_every"] = config.similarity_every
    if config.saturation_every:
        extra["saturation_every"] = config.saturation_every
    if config.conflict_every is None:
        return extra
    if not supports_conflict():
        warnings.warn("this GateWatch has no conflict_every option; task-conflict logging is skipped.",
                      RuntimeWarning, stacklevel=3)
        return extra
    return {**extra, "conflict_every": config.conflict_every}


class Unwatched:
    """Stands in for GateWatch when ``TrainConfig.watch`` is False: a plain backward pass, nothing logged."""

    def log_metrics(self, step: int, metrics: dict[str, dict[str, float]], *, split: str = "val") -> None:
        """Nothing to record."""

    def annotate(self, **fields: Any) -> None:
        """Nothing to record."""

    def grouped(self, labels: Tensor) -> nullcontext[None]:
        return nullcontext()

    def backward(self, losses: dict[str, Tensor]) -> None:
        sum(losses.values()).backward()  # type: ignore[union-attr]

    def step(self) -> None:
        """Nothing to record."""

    def close(self, *, error: BaseException | None = None) -> None:
        """Nothing to close."""


def log_eval(watch: GateWatch | Unwatched, step: int, split: str, metrics: dict[str, dict[str, float]]) -> None:
    """Record one evaluation: the run directory's ``eval`` table and TensorBoard's ``eval/...`` scalars."""
    watch.log_metrics(step, metrics, split=split)


def _postfix(running: dict[str, float], last_val: dict[str, dict[str, float]] | None) -> dict[str, str]:
    shown = {f"loss/{t}": f"{v:.4f}" for t, v in running.items()}
    for task, values in (last_val or {}).items():
        name = "auc" if "auc" in values else "mse"
        shown[f"val_{name}/{task}"] = f"{values[name]:.4f}"
    return shown


def train(
    config: TrainConfig,
    log_dir: str | Path,
    *,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    model_builder: ModelBuilder | None = None,
    note: str | None = None,
) -> TrainResult:
    """Train ``config`` into the run directory ``log_dir`` (see the module docstring).

    ``should_stop()`` is asked before every step; when it returns True training ends early and the run
    is closed normally (evaluated, saved, ``stopped_at`` recorded in run.json and metrics.json).
    ``on_step(step, {"losses": {task: float}})`` is called after every step. ``model_builder(splits,
    config)`` replaces the reference models; the model is saved with a factory reference when it has a
    ``config`` dict of constructor kwargs (like the reference models), else without one. ``note``: a line
    stored in run.json (``note``) that the dashboard shows above the run.
    """
    run_dir = Path(log_dir)
    splits = load_dataset(config.data, **config.data_kwargs)
    seed_everything(config.seed)
    model = (model_builder or build_model)(splits, config).to(config.device)
    try:
        factory = factory_ref(model)
    except ValueError:
        factory = None
    optimizer = OPTIMIZERS[config.optimizer](model.parameters(), lr=config.lr)
    stale = Staleness(model, config.staleness, config.staleness_delay, config.seed) if config.staleness else None
    tasks, kinds = splits.tasks, splits.task_types
    if unknown := sorted(set(config.task_weights) - set(tasks)):
        raise ValueError(f"TrainConfig.task_weights names tasks {unknown} that the data does not have; its tasks are "
                         f"{list(tasks)}.")
    x_train, y_train = splits.x_train, splits.y_train
    rows = batches(len(x_train), config.batch_size, torch.Generator().manual_seed(config.seed))
    run_config = {**asdict(config), "data_ref": splits.ref}
    groups = group_names(config, splits)
    labels = splits.domains.get("train") if groups else None
    run_dir.mkdir(parents=True, exist_ok=True)
    watch = Unwatched() if not config.watch else GateWatch(
        model, tasks=tasks, log_dir=run_dir, every=config.every, flush_every=config.flush_every,
        flush_secs=config.flush_secs, tensorboard=config.tensorboard, config=run_config, **watch_kwargs(config, groups))
    if note:
        watch.annotate(note=note)
    bar = tqdm(total=config.steps, desc=run_dir.name, disable=not progress or not sys.stderr.isatty(),
               dynamic_ncols=True, leave=True)
    running: dict[str, float] = {}
    last_val: dict[str, dict[str, float]] | None = None
    history: list[dict[str, Any]] = []  # validation metrics during training: {"step", task: {...}}
    stopped_at: int | None = None
    step = 0
    started = time.perf_counter()
    try:
        model.train()
        while step < config.steps:
            if should_stop is not None and should_stop():
                stopped_at = step
                break
            index = next(rows)
            x, y = x_train[index].to(config.device), y_train[index].to(config.device)
            with stale.stale() if stale is not None else nullcontext():
                with watch.grouped(labels[index].to(config.device)) if labels is not None else nullcontext():
                    outputs = model(x)
                losses = weighted(task_losses(outputs, y, tasks, kinds), config.task_weights)
                optimizer.zero_grad(set_to_none=True)
                watch.backward(losses)
            optimizer.step()
            watch.step()
            step += 1
            values = {t: float(v.detach()) for t, v in losses.items()}
            running = {t: v if t not in running else 0.95 * running[t] + 0.05 * v for t, v in values.items()}
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                last_val = evaluate(model, splits.x_val, splits.y_val, tasks, kinds)
                log_eval(watch, step, "val", last_val)
                history.append({"step": step, **last_val})
            if step % 10 == 0 or step == config.steps:
                bar.set_postfix(_postfix(running, last_val), refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, {"losses": values})
        seconds = time.perf_counter() - started
        final = {split: evaluate(model, getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}"), tasks, kinds)
                 for split in ("val", "test")}
        for split, split_metrics in final.items():
            log_eval(watch, step, split, split_metrics)
        history.append({"step": step, **final["val"]})
        metrics = {**final, "steps": step, "stopped_at": stopped_at, "train_seconds": seconds,
                   "tasks": tasks, "task_types": kinds, "history": history, "config": run_config}
        save_model(run_dir, model, factory=factory, data=splits.ref, tasks=tasks, task_types=kinds)
        atomic_write_json(run_dir / METRICS_FILE, metrics)
        if stopped_at is not None:
            watch.annotate(stopped_at=stopped_at)
    except BaseException as err:
        bar.close()
        watch.close(error=err)
        raise
    bar.close()
    watch.close()
    return TrainResult(run_dir=run_dir, metrics=metrics)
