"""Gradient conflict between tasks on the shared parameters, measured on scheduled steps.

A conflict step (K tasks, shared parameters holding M elements in all) runs:

1. before the backward: a flat copy of the shared parameters' ``.grad`` when they already hold one
   (gradient accumulation), then K-1 calls ``torch.autograd.grad(loss_k, shared, retain_graph=True,
   allow_unused=True)`` - one extra backward through the shared part per extra task, which is the floor;
2. the ordinary backward of ``sum(losses)``, untouched: the model's ``.grad`` ends up bit for bit what
   it would be without gatewatch;
3. the last task's gradient = ((``.grad`` after) - (``.grad`` before)) / (the factor the backward applied
   to the total loss, read from the gradient reaching it) - (the other tasks' gradients).

The K task gradients live in the first rows of one flat buffer (micro-batches of one step add up in it).
At ``watch.step()`` every parameter tensor gets the Gram matrix of the task gradients (one matmul) and,
per task pair, the count of elements with opposite signs; every module group gets the histogram of
GradDrop's sign purity. All of it goes into one small device tensor; nothing reaches the host before the
next flush, which moves every conflict step since the last one in a single transfer.

Shared parameters are found on the first conflict step: every task then gets its own ``autograd.grad``
over all trainable parameters, and a parameter that two or more tasks reach is shared. Under
torch.distributed the last task's gradient cannot come from ``.grad`` (it is averaged over ranks), so
every task gets its own ``autograd.grad``: the figures are those of the local rank's batch, and no extra
collective runs (``autograd.grad`` does not fire DDP's gradient hooks; the final backward does).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .gates import unwrap
from .report import SECTIONS, _num
from .runs import Run
from .schedules import Schedule, describe
from .schema import conform, frame

PURITY_BINS = 10  # GradDrop purity histogram over [0, 1]
PARAM_ROW_LIMIT = 256  # above this many shared tensors, rows per tensor are left out (modules and "all" stay)
SHARED_NAMES_LIMIT = 2048  # run.json lists the shared tensors up to this many

SharedSpec = str | nn.Module | Sequence[str | nn.Module] | None
GroupSpec = int | Callable[[str], str] | None


class ConflictError(ValueError):
    """Conflict settings that cannot work; the message says what to pass instead."""


# ---------------------------------------------------------------------------------------------- grouping
def module_grouper(model: nn.Module, spec: GroupSpec = None) -> Callable[[str], str]:
    """The function parameter name -> module group.

    * ``None``: the module owning the parameter, where a module inside an ``nn.Sequential`` counts as part
      of it (an MLP expert is one group: ``experts.3``); a leaf layer (``Linear`` ...) inside a
      ``ModuleList`` / ``ModuleDict`` groups with its siblings under the child of the deepest such
      container (a router's expert ``layers.2.moe.experts.5``, a transformer layer ``layers.2``);
    * an int ``n``: the first ``n`` components of the owning module's path (``2``: ``levels.0``);
    * a callable ``name -> str``.
    """
    if callable(spec):
        return spec
    if spec is not None:
        if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
            raise ConflictError(
                f"conflict_group must be None, a positive module-path depth or a callable name -> group; got {spec!r}."
            )
        depth = spec
        return lambda name: ".".join(name.split(".")[:-1][:depth]) or name
    modules = dict(model.named_modules())
    containers = {path for path, m in modules.items() if isinstance(m, (nn.ModuleList, nn.ModuleDict))}

    def group(name: str) -> str:
        parts = name.split(".")[:-1]
        while len(parts) > 1 and isinstance(modules.get(".".join(parts[:-1])), nn.Sequential):
            parts = parts[:-1]
        owner = modules.get(".".join(parts))
        if owner is not None and next(owner.children(), None) is None:
            for i in range(len(parts) - 1, 0, -1):
                if ".".join(parts[:i]) in containers:
                    return ".".join(parts[: i + 1])
        return ".".join(parts) or name

    return group


def select_shared(model: nn.Module, spec: SharedSpec) -> list[str] | None:
    """Names of the parameters picked by ``shared=`` (names, name prefixes or modules); None when not given."""
    if spec is None:
        return None
    items = [spec] if isinstance(spec, (str, nn.Module)) else list(spec)
    if not items:
        raise ConflictError("shared= is empty: pass parameter names, name prefixes or modules, or None to discover.")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    chosen: dict[str, None] = {}
    for item in items:
        if isinstance(item, nn.Module):
            ids = {id(p) for p in item.parameters()}
            hits = [n for n, p in params if id(p) in ids]
            what = f"module {type(item).__name__}"
        elif isinstance(item, str):
            hits = [n for n, _ in params if n == item or n.startswith(item + ".")]
            what = repr(item)
        else:
            raise ConflictError(f"shared= takes parameter names, prefixes or modules; got {type(item).__name__}.")
        if not hits:
            near = sorted({n.rsplit(".", 2)[0] for n, _ in params})[:12]
            raise ConflictError(
                f"shared={what} matches no trainable parameter of {type(model).__name__}. Pass names or prefixes "
                f"from model.named_parameters(), e.g. {near}, or modules of this model."
            )
        chosen.update(dict.fromkeys(hits))
    return list(chosen)


# ---------------------------------------------------------------------------------------------- maths
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
    for i, parts in histogram_plan(bounds):
        counts[i] = count(*bounds[i]) if parts is None else torch.stack([counts[j] for j in parts]).sum(0)
    return torch.stack(counts)


def histogram_plan(bounds: Sequence[tuple[int, int]]) -> list[tuple[int, list[int] | None]]:
    """In which order to histogram each range, and from what: ``(i, None)`` counts range i's elements,
    ``(i, [j, ...])`` adds up the counts of smaller ranges j that tile it end to end (e.g. "all" from the
    modules), so that an element is binned once however many ranges hold it. Smaller ranges come first."""
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
                    groups: Sequence[tuple[int, int]], bins: int) -> torch.Tensor:
    """Everything a conflict step logs, as one flat device tensor (no host synchronisation).

    ``stack [stack_rows(K), M]`` holds the K task gradients in its first K rows (left as their absolute
    values); the rest is scratch space.
    ``units`` are the element ranges that get statistics (each parameter tensor, or each group), ``groups``
    the ranges that get a purity histogram. Layout of the result: the ``[U, K, K]`` Gram matrices of the
    task gradients, the ``[U, pairs]`` counts of elements where a pair's gradients have opposite signs,
    then the ``[G, bins + 1]`` purity counts.
    """
    g = stack[:k]
    pairs = task_pairs(k)
    opposite = stack[k : k + len(pairs)]
    for row, (a, b) in zip(opposite, pairs, strict=True):
        torch.mul(g[a], g[b], out=row)
    opposite.lt_(0)  # 1 where the pair's gradients have opposite signs
    grams = torch.stack([g[:, s:e] @ g[:, s:e].T for s, e in units])
    disagree = torch.stack([opposite[:, s:e].sum(1) for s, e in units])
    counts = purity_counts(g, groups, bins, scratch=stack[k : k + 2])
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


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class SharedLayout:
    """The shared parameters in group order, their place in the flat buffer, and which task reaches which."""

    names: list[str]
    params: list[nn.Parameter]
    groups: list[str]
    group_of: list[int]  # group index of each parameter
    reach: list[list[bool]]  # [task][parameter]: the task's loss reaches the parameter
    per_param: bool
    bounds: list[tuple[int, int]] = field(init=False)
    group_bounds: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        start, self.bounds = 0, []
        for p in self.params:
            self.bounds.append((start, start + p.numel()))
            start += p.numel()
        self.group_bounds = []
        for gi in range(len(self.groups)):
            members = [b for b, g in zip(self.bounds, self.group_of, strict=True) if g == gi]
            self.group_bounds.append((members[0][0], members[-1][1]))

    @property
    def size(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    @property
    def units(self) -> list[tuple[int, int]]:
        return self.bounds if self.per_param else self.group_bounds

    def elements(self, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        return np.array([e - s for s, e in bounds], dtype=np.float64)

    @classmethod
    def build(cls, names: list[str], params: list[nn.Parameter], reach: list[list[bool]],
              grouper: Callable[[str], str], param_limit: int) -> SharedLayout:
        """Order the parameters so that every group's elements are contiguous (groups in first-seen order)."""
        labels = [str(grouper(n)) for n in names]
        groups = list(dict.fromkeys(labels))
        order = sorted(range(len(names)), key=lambda i: groups.index(labels[i]))
        return cls(
            names=[names[i] for i in order], params=[params[i] for i in order], groups=groups,
            group_of=[groups.index(labels[i]) for i in order], reach=[[r[i] for i in order] for r in reach],
            per_param=len(names) <= param_limit,
        )


@dataclass
class _Pending:
    """One conflict step on the device, until the next flush."""

    step: int
    tasks: list[str]
    flat: torch.Tensor


# ---------------------------------------------------------------------------------------------- monitor
class ConflictMonitor:
    """Per-task gradients on the shared parameters on scheduled steps, reduced on the device.

    :class:`~gatewatch.GateWatch` drives it: :meth:`due`, then :meth:`before_backward` /
    :meth:`after_backward` around each backward of a conflict step, :meth:`end_step` at ``watch.step()``
    and :meth:`tables` at flush.
    """

    def __init__(self, model: nn.Module, *, schedule: Schedule, shared: SharedSpec = None, threshold: float = 0.0,
                 group: GroupSpec = None, param_limit: int = PARAM_ROW_LIMIT, distributed: bool = False) -> None:
        if not -1.0 < threshold <= 0.0:
            raise ConflictError(
                f"conflict_threshold is a cosine S in (-1, 0] (a step counts as conflict when cosine < S); "
                f"got {threshold}."
            )
        if isinstance(param_limit, bool) or not isinstance(param_limit, int) or param_limit < 0:
            raise ConflictError(f"conflict_param_limit must be an integer >= 0, got {param_limit!r}.")
        self.model = unwrap(model)
        self.schedule = schedule
        self.threshold = threshold
        self.param_limit = param_limit
        self.grouper = module_grouper(self.model, group)
        self.shared_names = select_shared(self.model, shared)
        self.exact = distributed  # every task by autograd.grad (no subtraction from .grad)
        self.layout: SharedLayout | None = None
        self.disabled: str | None = None
        self._due: tuple[int, bool] = (-1, False)
        self._step: int | None = None  # the step being measured, while its gradients are pending
        self._tasks: list[str] = []
        self._stack: torch.Tensor | None = None  # [stack_rows(K), M]: the step's task gradients, then scratch
        self._micro: torch.Tensor | None = None  # [K, M]: a further micro-batch of the same step
        self._before: torch.Tensor | None = None  # [M]: .grad of the shared parameters before the backward
        self._filled = False  # the stack holds gradients of this step
        self._current: torch.Tensor | None = None  # the micro-batch being measured
        self._computed = 0  # tasks of the current micro-batch computed before the backward
        self._probe: list[Sequence[torch.Tensor | None]] | None = None  # every task's gradient, discovery step
        self._has_before = False
        self._scale: torch.Tensor | None = None  # the factor the backward applied to the total loss
        self._pending: list[_Pending] = []
        self._below: dict[tuple[str, str, str], np.ndarray] = {}  # (scope, task a, task b) -> count per name

    # ------------------------------------------------------------------ schedule
    def due(self, step: int) -> bool:
        """Is ``step`` (counting from 1) a conflict step?"""
        if self.disabled is not None:
            return False
        if self._due[0] != step:
            self._due = (step, bool(self.schedule(step)))
        return self._due[1]

    # ------------------------------------------------------------------ gradients
    def before_backward(self, items: list[tuple[str, torch.Tensor]], total: torch.Tensor, step: int) -> bool:
        """Compute the task gradients the backward of ``total`` cannot give. False: nothing is measured."""
        tasks = [t for t, _ in items]
        if len(items) < 2:
            self._disable(f"conflict needs two or more task losses, got {tasks}")
            return False
        if not total.requires_grad:
            return False
        if self._step is not None and (self._step != step or tasks != self._tasks):
            self.end_step()
        if self.layout is None and not self._discover(items):
            return False
        layout = self.layout
        assert layout is not None
        k = len(items)
        self._tasks, self._step = tasks, step
        g = self._target(k)
        exact = self.exact or self._probe is not None
        self._computed = k if exact else k - 1
        self._has_before = not exact and any(p.grad is not None for p in layout.params)
        if self._has_before:
            if self._before is None or self._before.numel() != layout.size:
                self._before = torch.empty_like(g[0])
            self._flat_grads(self._before, [p.grad for p in layout.params])
        for i in range(self._computed):
            grads = self._probe[i] if self._probe is not None else self._task_grads(items[i][1])
            self._flat_grads(g[i], grads)
        self._probe = None
        self._current = g
        self._scale = None
        total.register_hook(self._seen)
        return True

    def _seen(self, grad: torch.Tensor) -> None:
        """The gradient reaching ``total``: the factor the backward applied to it (AMP loss scale, 1/accumulation)."""
        self._scale = grad.detach()

    def after_backward(self) -> None:
        """Finish the micro-batch after the backward: last task by subtraction, then add it to the step's sum."""
        g, self._current = self._current, None
        if g is None:
            return
        if self._scale is None:
            raise RuntimeError(
                "The backward of the total loss did not run inside `with watch.task_gradients(losses) as total:`. "
                "Call your backward on `total` (or on a scaled `total`) inside the block."
            )
        layout = self.layout
        assert layout is not None
        k = g.shape[0]
        if self._computed < k:
            last = g[k - 1]
            self._flat_grads(last, [p.grad for p in layout.params])
            if self._has_before:
                assert self._before is not None
                last.sub_(self._before)
            last.div_(self._scale)  # .grad holds scale * gradient; autograd.grad gave the loss's own
            for i in range(k - 1):
                last.sub_(g[i])
            for i, (s, e) in enumerate(layout.bounds):
                if not layout.reach[k - 1][i]:
                    last[s:e].zero_()  # rounding noise on a parameter the last task cannot reach
        if self._filled:
            assert self._stack is not None
            self._stack[:k].add_(g)
        self._filled = True

    def abort(self) -> None:
        """Forget the micro-batch being measured (its backward raised)."""
        self._current = None

    def end_step(self) -> None:
        """Reduce the step's task gradients to one flat device tensor, kept until the next flush."""
        step, self._step = self._step, None
        filled, self._filled = self._filled, False
        if not filled or step is None or self.layout is None or self._stack is None:
            return
        k = len(self._tasks)
        flat = task_statistics(self._stack, k, self.layout.units, self.layout.group_bounds, PURITY_BINS)
        self._pending.append(_Pending(step, list(self._tasks), flat))

    # ------------------------------------------------------------------ helpers
    def _target(self, k: int) -> torch.Tensor:
        """Where this micro-batch's ``[K, M]`` task gradients go: the stack, or a second buffer after the first."""
        assert self.layout is not None
        p0 = self.layout.params[0]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.layout.params) else torch.float32
        if self._stack is None or self._stack.shape != (stack_rows(k), self.layout.size):
            self._stack = torch.empty(stack_rows(k), self.layout.size, dtype=dtype, device=p0.device)
            self._micro, self._before = None, None
        if not self._filled:
            return self._stack[:k]
        if self._micro is None:
            self._micro = torch.empty(k, self.layout.size, dtype=dtype, device=p0.device)
        return self._micro

    def _task_grads(self, loss: torch.Tensor) -> Sequence[torch.Tensor | None]:
        """``loss``'s gradient on each shared parameter (None where it does not reach)."""
        assert self.layout is not None
        params = self.layout.params
        if not loss.requires_grad:
            return [None] * len(params)
        active = [i for i, p in enumerate(params) if p.requires_grad]
        if len(active) == len(params):
            return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out: list[torch.Tensor | None] = [None] * len(params)
        if active:
            got = torch.autograd.grad(loss, [params[i] for i in active], retain_graph=True, allow_unused=True)
            for i, grad in zip(active, got, strict=True):
                out[i] = grad
        return out

    def _flat_grads(self, out: torch.Tensor, grads: Iterable[torch.Tensor | None]) -> torch.Tensor:
        """Write gradients (None: zeros) into the flat row ``out``."""
        assert self.layout is not None
        parts = [g.reshape(-1) if g is not None else torch.zeros(p.numel(), dtype=out.dtype, device=out.device)
                 for g, p in zip(grads, self.layout.params, strict=True)]
        return torch.cat(parts, out=out)

    def _discover(self, items: list[tuple[str, torch.Tensor]]) -> bool:
        """Find the shared parameters (the first conflict step): every task's gradient, once."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.shared_names is not None:
            wanted = set(self.shared_names)
            named = [(n, p) for n, p in named if n in wanted]
        names, params = [n for n, _ in named], [p for _, p in named]
        grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if loss.requires_grad
                 else (None,) * len(params) for _, loss in items]
        reach = [[g is not None for g in task] for task in grads]
        if self.shared_names is None:
            keep = [i for i in range(len(params)) if sum(r[i] for r in reach) >= 2]
        else:
            keep = list(range(len(params)))
        if not keep:
            self._disable(
                f"no parameter receives gradient from two or more of the tasks {[t for t, _ in items]}, so there "
                "is nothing to compare. Pass shared= to name the parameters to compare"
            )
            return False
        devices = {params[i].device for i in keep}
        if len(devices) > 1:
            self._disable(f"the shared parameters span several devices ({sorted(map(str, devices))}); pass "
                          "shared= with parameters of one device")
            return False
        self.layout = SharedLayout.build(
            [names[i] for i in keep], [params[i] for i in keep], [[r[i] for i in keep] for r in reach],
            self.grouper, self.param_limit,
        )
        position = {n: i for i, n in enumerate(names)}
        order = [position[n] for n in self.layout.names]
        self._probe = [[task[i] for i in order] for task in grads]
        return True

    def _disable(self, why: str) -> None:
        self.disabled = why
        warnings.warn(f"gatewatch: task-conflict logging is off: {why}.", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ rows
    def tables(self) -> dict[str, pd.DataFrame]:
        """Rows of every conflict step since the last call (one device-to-host transfer for all of them)."""
        pending, self._pending = self._pending, []
        layout = self.layout
        if not pending or layout is None:
            return {"conflict": frame("conflict"), "purity": frame("purity")}
        tasks = pending[0].tasks
        k, n_units, n_groups, pairs = len(tasks), len(layout.units), len(layout.groups), task_pairs(len(tasks))
        host = torch.stack([p.flat for p in pending]).to("cpu", torch.float64).numpy()
        steps = np.array([p.step for p in pending])
        sizes = [n_units * k * k, n_units * len(pairs)]
        grams, disagree, counts = np.split(host, np.cumsum(sizes), axis=1)
        grams, disagree = grams.reshape(len(steps), n_units, k, k), disagree.reshape(len(steps), n_units, len(pairs))
        counts = counts.reshape(len(steps), n_groups, PURITY_BINS + 1)[:, :, :PURITY_BINS]
        if layout.per_param:
            member = np.zeros((n_groups, n_units))
            member[layout.group_of, np.arange(n_units)] = 1.0
            by_group = (np.einsum("gu,sukl->sgkl", member, grams), np.einsum("gu,sup->sgp", member, disagree))
        else:
            by_group = (grams, disagree)
        scopes = [("module", layout.groups, *by_group, layout.elements(layout.group_bounds)),
                  ("all", ["all"], by_group[0].sum(1, keepdims=True), by_group[1].sum(1, keepdims=True),
                   np.array([float(layout.size)]))]
        if layout.per_param:
            scopes.insert(0, ("param", layout.names, grams, disagree, layout.elements(layout.bounds)))
        frames = [self._scope_rows(steps, tasks, pairs, *scope) for scope in scopes]
        return {"conflict": conform("conflict", pd.concat(frames, ignore_index=True)),
                "purity": _purity_rows(steps, [*layout.groups, "all"],
                                       np.concatenate([counts, counts.sum(1, keepdims=True)], axis=1))}

    def _scope_rows(self, steps: np.ndarray, tasks: list[str], pairs: list[tuple[int, int]], scope: str,
                    names: list[str], gram: np.ndarray, disagree: np.ndarray, elements: np.ndarray) -> pd.DataFrame:
        """Rows of one scope: ``gram [S, N, K, K]`` and ``disagree [S, N, pairs]`` over S steps and N names."""
        n_steps, n_names = len(steps), len(names)
        columns: dict[str, list[np.ndarray]] = defaultdict(list)
        for i, (a, b) in enumerate(pairs):
            stats = pair_table(gram, disagree[..., i], elements, a, b)
            hits = ((stats["cosine"] < self.threshold) & ~stats["zero_grad"]).astype(np.int64)
            key = (scope, tasks[a], tasks[b])
            below = self._below.get(key, np.zeros(n_names, dtype=np.int64)) + np.cumsum(hits, axis=0)
            self._below[key] = below[-1]
            stats["below"] = below
            for col, values in stats.items():
                columns[col].append(values.reshape(-1))
            columns["task_a"].append(np.full(n_steps * n_names, tasks[a], dtype=object))
            columns["task_b"].append(np.full(n_steps * n_names, tasks[b], dtype=object))
        n_pairs = len(pairs)
        return pd.DataFrame({
            "step": np.tile(np.repeat(steps, n_names), n_pairs), "scope": scope,
            "name": np.tile(np.array(names, dtype=object), n_steps * n_pairs),
            **{col: np.concatenate(parts) for col, parts in columns.items()},
            "elements": np.tile(elements.astype(np.int64), n_steps * n_pairs),
        })

    # ------------------------------------------------------------------ metadata
    def describe(self) -> dict[str, Any]:
        """What run.json records about conflict logging."""
        layout = self.layout
        out: dict[str, Any] = {
            "schedule": describe(self.schedule), "threshold": self.threshold, "purity_bins": PURITY_BINS,
            "method": "autograd.grad per task" if self.exact else "K-1 autograd.grad + subtraction",
            "disabled": self.disabled,
        }
        if layout is not None:
            out.update(
                per_param=layout.per_param, tensors=len(layout.names), elements=layout.size,
                groups={g: sum(1 for x in layout.group_of if x == i) for i, g in enumerate(layout.groups)},
                shared=layout.names if len(layout.names) <= SHARED_NAMES_LIMIT else None,
            )
        return out


def _purity_rows(steps: np.ndarray, names: list[str], counts: np.ndarray) -> pd.DataFrame:
    """Rows of the ``purity`` table from ``counts [S, N, bins]`` (the last name is ``all``)."""
    n_steps, n_names, bins = counts.shape
    edges = np.linspace(0.0, 1.0, bins + 1)
    scopes = np.array(["module"] * (n_names - 1) + ["all"], dtype=object)
    return conform("purity", pd.DataFrame({
        "step": np.repeat(steps, n_names * bins), "scope": np.tile(np.repeat(scopes, bins), n_steps),
        "name": np.tile(np.repeat(np.array(names, dtype=object), bins), n_steps),
        "bin": np.tile(np.arange(bins), n_steps * n_names), "lo": np.tile(edges[:-1], n_steps * n_names),
        "hi": np.tile(edges[1:], n_steps * n_names), "count": counts.reshape(-1),
    }))


# ---------------------------------------------------------------------------------------------- report
HOT_SPOTS = 3  # modules listed per task pair in the report


def conflict_summary(run: Run) -> list[dict[str, Any]]:
    """The report's ``conflict`` list: per task pair, all shared parameters at the last measured step.

    Each entry: ``tasks [a, b]``, ``step``, ``cosine``, ``sign_conflict``, ``magnitude_sim``, ``norm_a``,
    ``norm_b``, ``zero_grad``, ``below`` (measured steps with cosine below the threshold), ``measured``
    (conflict steps in the run) and ``hot_spots``: the modules where the pair's cosine fell below the
    threshold most often (``name``, ``below``, ``cosine`` at the last step).
    """
    table = run.table("conflict")
    if not len(table):
        return []
    out = []
    for (a, b), rows in table.groupby(["task_a", "task_b"], sort=False):
        total = rows[(rows["scope"] == "all") & (rows["step"] == rows["step"].max())]
        if not len(total):
            continue
        row = total.iloc[-1]
        modules = rows[(rows["scope"] == "module") & (rows["step"] == row["step"])]
        hot = modules[modules["below"] > 0].sort_values(["below", "cosine"], ascending=[False, True])
        out.append({
            "tasks": [str(a), str(b)], "step": int(row["step"]), "cosine": _num(row["cosine"]),
            "sign_conflict": _num(row["sign_conflict"]), "magnitude_sim": _num(row["magnitude_sim"]),
            "norm_a": _num(row["norm_a"]), "norm_b": _num(row["norm_b"]), "zero_grad": bool(row["zero_grad"]),
            "below": int(row["below"]), "measured": int(rows.loc[rows["scope"] == "all", "step"].nunique()),
            "hot_spots": [{"name": str(h["name"]), "below": int(h["below"]), "cosine": _num(h["cosine"])}
                          for _, h in hot.head(HOT_SPOTS).iterrows()],
        })
    return out


SECTIONS["conflict"] = conflict_summary
