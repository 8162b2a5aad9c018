"""Gradient conflict, capture half: each task's gradient on the shared parameters, on scheduled steps.

A conflict step (K tasks, shared parameters holding M elements in all) runs:

1. before the backward: a flat copy of the shared parameters' ``.grad`` when they already hold one
   (gradient accumulation), then K-1 calls ``torch.autograd.grad(loss_k, shared, retain_graph=True,
   allow_unused=True)`` - one extra backward through the shared part per extra task, which is the floor;
2. the ordinary backward of ``sum(losses)``, untouched: the model's ``.grad`` ends up bit for bit what
   it would be without gatewatch;
3. the last task's gradient = ((``.grad`` after) - (``.grad`` before)) / (the factor the backward applied
   to the total loss, read from the gradient reaching it) - (the other tasks' gradients).

The K task gradients live in the first rows of one flat buffer (micro-batches of one step add up in it).
Right after the backward (at ``watch.step()`` when the steps have several micro-batches, or when no tensor is
large enough to be sampled) every parameter tensor gets the Gram matrix of the task gradients (one batched
matmul for the tensors of one size at evenly spaced places, :class:`~.maths.UnitRuns`) and, per task pair, the
count of elements with opposite signs; every module group gets the histogram of GradDrop's sign purity (both
counted on a fixed sample of 4,096 elements of each tensor of 16,384 or more, see
:mod:`~gatewatch.quantities.conflict.maths`). All of it goes into one small device tensor, kept until the flush.

Shared parameters are found on the first conflict step: every task then gets its own ``autograd.grad``
over all trainable parameters, and a parameter that two or more tasks reach is shared. Under
torch.distributed (DDP, FSDP2) ``autograd.grad`` fires neither DDP's gradient hooks nor FSDP2's reduce-scatter,
so the model's ``.grad`` is unchanged; under FSDP2 it is taken on the unsharded parameters the forward used
(:func:`~gatewatch.capture.sharding.graph_leaves`). Then, by ``conflict_scope``:

* ``"applied"`` (the default): each task's gradient is that of the mean over the data-parallel ranks of each
  rank's mean loss, the gradient the optimizer applies. Under DDP, when the backward syncs (not inside
  ``no_sync()``, no communication hook) and ``.grad`` was empty, K-1 tasks get ``autograd.grad``, one
  ``all_reduce`` of their ``[K-1, M]`` rows averages them, and the last task is DDP's averaged ``.grad`` minus
  them; otherwise (accumulation, ``no_sync()``, FSDP2) every task gets its own ``autograd.grad`` and one
  ``all_reduce`` of the ``[K, M]`` rows averages them before the statistics;
* ``"local"``: no communication; the figures are rank 0's own batch (every task by ``autograd.grad``: ``.grad``
  is averaged over ranks, or sharded).

Under expert parallelism (a mesh with ``ep``) each rank holds some of the experts, under tensor parallelism (a mesh
with ``tp``) a slice of each tensor-parallel parameter: the applied scope's gradients and the statistics of one
process holding every parameter whole are put together from every rank's (:mod:`.shards`).

Every collective runs in a gloo group of gatewatch's own over the data-parallel ranks, with a timeout
(:func:`~gatewatch.capture.distributed.own_copy`), on CPU copies of the rows. Under FSDP2 each extra
``autograd.grad`` all-gathers parameters in the training's own group, so a conflict step first checks, in
gatewatch's group, that every rank's watch measures it. A rank that stopped its watch therefore never hangs the
others: the collective fails (at once, or after ``FLUSH_TIMEOUT_S``), and conflict logging turns off with a
warning naming the rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ...capture.distributed import others, own_copy
from ...capture.mesh import EXPERT_DIM, TENSOR_DIM, expert_shard, tensor_shard, token_dims
from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows
from ...capture.sharding import (
    data_parallel_group,
    expert_replica_group,
    flat_group,
    graph_leaves,
    group_size,
    is_sharded,
)
from ...gating.discovery import expected_width
from ...gating.expert_map import find_experts
from ...gating.specs import ResolvedGate
from ...schedules import Schedule, as_schedule, describe
from ...validate import non_negative_int
from ...wrappers import unwrap
from .layout import ConflictError, GroupSpec, SharedLayout, SharedSpec, module_grouper, select_shared
from .maths import (
    PURITY_BINS,
    SAMPLE_FROM,
    SAMPLE_SEED,
    SAMPLE_SIZE,
    SignSample,
    UnitRuns,
    stack_rows,
    task_statistics,
)
from .rows import conflict_tables
from .shards import LOCAL_SCOPE, RankShards, local_parts, tensor_split

PARAM_ROW_LIMIT = 256  # above this many shared tensors, rows per tensor are left out (modules and "all" stay)
SHARED_NAMES_LIMIT = 2048  # run.json lists the shared tensors up to this many

KEYWORDS: dict[str, Any] = {
    "conflict_every": 0, "shared": None, "conflict_threshold": 0.0, "conflict_group": None,
    "conflict_param_limit": PARAM_ROW_LIMIT, "conflict_scope": "applied",
}
SCOPES = ("applied", "local")  # the gradients the optimizer applies (averaged over ranks) / this rank's batch


def build(ctx: CaptureContext) -> ConflictGradients | None:
    """The conflict quantity for GateWatch's conflict keywords (None when ``conflict_every`` is off)."""
    o = ctx.options
    schedule = as_schedule("conflict_every", o["conflict_every"])
    if schedule is None:
        return None
    if ctx.tasks is not None and len(ctx.tasks) < 2:
        raise ConflictError(f"conflict_every compares tasks, but tasks={list(ctx.tasks)} has one; set "
                            "conflict_every=0.")
    refuse_layout(ctx.mesh)
    quantity = ConflictGradients(ctx.model, schedule=schedule, shared=o["shared"], threshold=o["conflict_threshold"],
                             group=o["conflict_group"], param_limit=o["conflict_param_limit"],
                             distributed=ctx.distributed, gates=ctx.gates, scope=o["conflict_scope"],
                             ranks=data_parallel_group(ctx.model, ctx.mesh) if ctx.distributed else None,
                             wrapper=ctx.model, mesh=ctx.mesh)
    warn_unmapped(ctx.model, ctx.gates, ctx.tasks, ctx.mesh)
    return quantity


ACROSS_STAGES = ("conflict_every: gradient conflict is not measured across pipeline stages (a mesh with 'pp'): each "
                 "task's gradient comes from torch.autograd.grad on the task's loss, and autograd.grad cannot cross "
                 "the send/recv between stages, so the stages before the last never see a per-task gradient. Set "
                 "conflict_every=0 (the gate, router and loss statistics of every stage stay exact), or measure "
                 "conflict within one stage: a run of that stage's layers with the task heads, without 'pp'.")


def refuse_layout(mesh: Any) -> None:
    """Refuse gradient conflict on a mesh layout it cannot measure exactly (across pipeline stages), saying why."""
    if "pp" in (getattr(mesh, "mesh_dim_names", None) or ()):
        raise ConflictError(ACROSS_STAGES)


def check_scope(scope: object) -> str:
    """``conflict_scope``, checked."""
    if scope not in SCOPES:
        raise ConflictError(f"conflict_scope must be one of {list(SCOPES)}: 'applied' measures the gradients the "
                            f"optimizer applies (averaged over the data-parallel ranks), 'local' rank 0's own batch "
                            f"with no communication; got {scope!r}.")
    return str(scope)


def leaves(model: nn.Module, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the forward used for ``params``: FSDP2's unsharded copies, the parameters themselves otherwise."""
    unsharded = graph_leaves(model)
    return [unsharded.get(id(p), p) for p in params] if unsharded else list(params)


def warn_unmapped(model: nn.Module, gates: Sequence[ResolvedGate], tasks: Sequence[str] | None,
                  mesh: Any = None) -> None:
    """Warn once, at construction, about the gates whose experts cannot be found, so that their per-expert
    conflict (``expert_conflict``) cannot be computed; on a mesh with ``ep``, about the gates whose experts are not
    fused ``[E/ep, ...]`` slices, so that gradient conflict will turn off. A gate's width is known at its first
    output; here the experts are looked for with the count the gate's module suggests (a router's weight rows, the
    Linear before a softmax); a gate whose count cannot be told yet is checked at its first output (run.json's
    ``expert_map``)."""
    model = unwrap(model)
    ranks = (expert_shard(mesh) or (0, 1))[1]
    missing = {}
    for gate in gates:
        if gate.fused is not None or (gate.expert_modules is not None and ranks == 1):
            continue
        width = expected_width(model, gate)
        if width is None:
            continue
        if width % ranks:
            missing[gate.name] = f"its {width} experts do not split evenly over {ranks} 'ep' ranks"
            continue
        paths, fused, why = find_experts(model, gate.path, width // ranks, gate.task, tasks, gate.experts)
        if fused is None and (paths is None or ranks > 1):
            missing[gate.name] = why if paths is None else "each 'ep' rank holds its experts as separate modules"
    if missing:
        said = "; ".join(f"{name}: {why}" for name, why in list(missing.items())[:3])
        more = f" (and {len(missing) - 3} more gates)" if len(missing) > 3 else ""
        what = ("gradient conflict will be off on this mesh with 'ep' (every gate's experts must be fused "
                "[E/ep, ...] slices, to be told from the replicated parameters), because of" if ranks > 1 else
                "expert_conflict will be skipped for")
        warnings.warn(f"gatewatch: {what} {len(missing)} gate(s): {said}{more}.", RuntimeWarning, stacklevel=4)


class ConflictGradients(Quantity):
    """Per-task gradients on the shared parameters on scheduled steps, reduced on the device.

    The watch drives it: :meth:`around_backward` (:meth:`before_backward` / :meth:`after_backward`) around each
    backward of a conflict step (:meth:`due`), :meth:`on_step` at ``watch.step()``. Its one state, ``"steps"``,
    holds a row of statistics per measured step: REPLICATED, rank 0's figures (under the ``"applied"`` scope every
    rank computes the same ones from the all-reduced gradients; under ``"local"`` each its own batch's).
    """

    name = "conflict"

    def __init__(self, model: nn.Module, *, schedule: Schedule, shared: SharedSpec = None, threshold: float = 0.0,
                 group: GroupSpec = None, param_limit: int = PARAM_ROW_LIMIT, distributed: bool = False,
                 gates: Sequence[ResolvedGate] = (), scope: str = "applied", ranks: Any = None,
                 wrapper: nn.Module | None = None, mesh: Any = None) -> None:
        if not -1.0 < threshold <= 0.0:
            raise ConflictError(
                f"conflict_threshold is a cosine S in (-1, 0] (a step counts as conflict when cosine < S); "
                f"got {threshold}."
            )
        non_negative_int("conflict_param_limit", param_limit, unit="parameter tensors")
        self.model = unwrap(model)
        self.schedule = schedule
        self.threshold = threshold
        self.param_limit = param_limit
        self.grouper = module_grouper(self.model, group)
        self.expert_groups = group is None  # fused experts' slices group by expert unless conflict_group says
        self.gates = gates  # their fused experts (known after their first output) are cut into slices
        self.shared_names = select_shared(self.model, shared)
        self.scope = check_scope(scope)
        self.distributed = distributed
        self.wrapper = wrapper if wrapper is not None else model  # DDP's wrapper: does this backward sync?
        self.sharded = any(is_sharded(p) for p in self.model.parameters())
        self.exact = distributed or self.sharded  # every task by autograd.grad, unless DDP's averaged .grad serves
        self.averaged = distributed and self.scope == "applied"  # all-reduce the task gradients before the statistics
        # gatewatch's own gloo group over the data-parallel ranks ``ranks`` (the training's; None: every rank)
        self.group = own_copy(ranks) if distributed and (self.averaged or self.sharded) else None
        if expert_shard(mesh) is not None and self.scope != "applied":
            raise ConflictError(LOCAL_SCOPE)
        self.shards = self._rank_shards(mesh) if distributed else None  # under 'ep' / 'tp': every rank's part
        self.layout: SharedLayout | None = None
        self.disabled: str | None = None
        self._due: tuple[int, bool] = (-1, False)
        self._step: int | None = None  # the step being measured, while its gradients are pending
        self._tasks: list[str] = []
        self._stack: torch.Tensor | None = None  # [stack_rows(K), M]: the step's task gradients, then scratch
        self._sample: SignSample | None = None  # where the sign statistics are counted (large tensors: a sample)
        self._plan: UnitRuns | None = None  # how the units' Gram matrices are batched
        self._micro: torch.Tensor | None = None  # [K, M]: a further micro-batch of the same step
        self._before: torch.Tensor | None = None  # [M]: .grad of the shared parameters before the backward
        self._filled = False  # the stack holds gradients of this step
        self._stack_averaged = False  # the stack's rows are already averaged over the data-parallel ranks
        self._fast = False  # this micro-batch's last task comes from DDP's averaged .grad
        self._reduced: torch.Tensor | None = None  # the step's statistics, reduced right after its one backward
        self._accumulates = False  # a step had several micro-batches: reduce at step() only
        self._current: torch.Tensor | None = None  # the micro-batch being measured
        self._computed = 0  # tasks of the current micro-batch computed before the backward
        self._probe: list[Sequence[torch.Tensor | None]] | None = None  # every task's gradient, discovery step
        self._has_before = False
        self._scale: torch.Tensor | None = None  # the factor the backward applied to the total loss
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []  # (step, tasks, statistics) until the flush
        self._collected: list[tuple[int, list[str]]] = []
        self._below: dict[tuple[str, str, str], np.ndarray] = {}  # (scope, task a, task b) -> count per name
        self.add_state("steps", Reduction.REPLICATED)

    def _rank_shards(self, mesh: Any) -> RankShards | None:
        """This rank's place along ``ep`` and ``tp`` of ``mesh`` and gatewatch's groups for them (None: neither)."""
        ep, tp = expert_shard(mesh), tensor_shard(mesh)
        if ep is None and tp is None:
            return None
        replicas = expert_replica_group(mesh) if ep is not None else None
        parts = [d for d in mesh.mesh_dim_names if d in (EXPERT_DIM, TENSOR_DIM)]
        return RankShards(ep, tp, tokens=self.group if token_dims(mesh) else None,
                          replicas=None if replicas is None else own_copy(replicas),
                          parts=own_copy(flat_group(mesh, parts)))

    @property
    def written(self) -> SharedLayout | None:
        """The layout the rows are written in: one process's, holding every parameter whole."""
        return self.shards.whole if self.shards is not None else self.layout

    # ------------------------------------------------------------------ schedule
    def due(self, step: int) -> bool:
        """Is ``step`` (counting from 1) a conflict step?"""
        if self.disabled is not None:
            return False
        if self._due[0] != step:
            self._due = (step, bool(self.schedule(step)))
        return self._due[1]

    def backward_due(self, step: int) -> bool:
        return self.due(step)

    # ------------------------------------------------------------------ gradients
    @contextmanager
    def around_backward(self, items: list[tuple[str, torch.Tensor]], total: torch.Tensor, step: int
                        ) -> Iterator[None]:
        """Measure the task gradients around the backward run inside the block, when ``step`` is a conflict step."""
        measuring = self.due(step) and self.before_backward(items, total, step)
        try:
            yield
        except BaseException:
            if measuring:
                self.abort()
            raise
        if measuring:
            self.after_backward()

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
        if (self.sharded or self.shards is not None) and self.group is not None and not self._all_measure():
            return False
        if self.layout is None and not self._discover(items):
            return False
        layout = self.layout
        assert layout is not None
        k = len(items)
        self._tasks, self._step = tasks, step
        g = self._target(k)
        exact = self.exact or self._probe is not None
        self._fast = self._probe is None and self._ddp_averages(layout.params)
        self._computed = k if exact and not self._fast else k - 1
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
            if self._fast and not self._average(g[: k - 1]):
                return
            last = g[k - 1]
            self._flat_grads(last, [p.grad for p in layout.params])
            if self._has_before:
                assert self._before is not None
                last.sub_(self._before)
            if last.device.type != "cpu" or float(self._scale) != 1.0:  # reading it on an accelerator would sync
                last.div_(self._scale)  # .grad holds scale * gradient; autograd.grad gave the loss's own
            for i in range(k - 1):
                last.sub_(g[i])
            for i in range(len(layout.params)):
                if not layout.reach[k - 1][i]:
                    for view, _ in layout.views(last, i):
                        view.zero_()  # rounding noise on a parameter the last task cannot reach
        if self._filled:
            assert self._stack is not None
            if self._fast != self._stack_averaged:  # rank-averaged rows meet this rank's own: average those first
                if not self._average(g if self._stack_averaged else self._stack[:k]):
                    return
                self._stack_averaged = True
            self._stack[:k].add_(g)
            self._reduced, self._accumulates = None, True  # micro-batches add up: reduce their sum at step()
        else:
            self._stack_averaged = self._fast
            if not self._accumulates and self._sample is not None and (not self.averaged or self._fast):
                # reduce now, while the gradients are in the cache; the sampled sign statistics leave the stack
                # intact, so a further micro-batch of this step can still add to it (and discards this)
                self._reduced = self._reduce()
        self._filled = self.disabled is None

    def abort(self) -> None:
        """Forget the micro-batch being measured (its backward raised)."""
        self._current = None

    def on_step(self, step: int) -> None:
        self.end_step()

    def end_step(self) -> None:
        """Reduce the step's task gradients to one flat device tensor, kept until the next flush."""
        step, self._step = self._step, None
        filled, self._filled = self._filled, False
        reduced, self._reduced = self._reduced, None
        if not filled or step is None or self.layout is None or self._stack is None:
            return
        reduced = reduced if reduced is not None else self._reduce()
        if reduced is not None:
            self._pending.append((step, list(self._tasks), reduced))

    def _reduce(self) -> torch.Tensor | None:
        """The statistics of the task gradients in the stack (:func:`~.maths.task_statistics`); None when the
        ranks could not average them (conflict logging is then off)."""
        assert self.layout is not None and self._stack is not None
        k = len(self._tasks)
        if self.averaged and not self._stack_averaged:  # the gradients of the mean over ranks of each rank's loss
            if not self._average(self._stack[:k]):
                return None
            self._stack_averaged = True
        if self.shards is not None:
            self.shards.count_once(self._stack[:k])
        stats = task_statistics(self._stack, k, self.layout.units, self.layout.group_bounds, PURITY_BINS,
                                self._sample, self._plan)
        if self.shards is None:
            return stats
        try:
            return self.shards.gather(stats, k)
        except RuntimeError as err:
            self._lost(err)
            return None

    # ------------------------------------------------------------------ across ranks
    def _ddp_averages(self, params: Sequence[torch.Tensor]) -> bool:
        """Will this backward leave in ``.grad`` exactly the mean over the data-parallel ranks of the total
        gradient? Under the applied scope with DDP: it syncs (not inside ``no_sync()``), with no communication
        hook or mixed precision, and ``.grad`` is empty (the ranks zero their gradients alike, as DDP needs)."""
        ddp = self.wrapper
        return (self.averaged and not self.sharded and type(ddp).__name__ == "DistributedDataParallel"
                and bool(getattr(ddp, "require_backward_grad_sync", False)) and not getattr(ddp, "_comm_hooks", None)
                and getattr(ddp, "mixed_precision", None) is None and all(p.grad is None for p in params))

    def _average(self, rows: torch.Tensor) -> bool:
        """Replace ``rows`` (this rank's task gradients) by their mean over the data-parallel ranks, in
        gatewatch's own gloo group; False, and conflict logging off, when a rank stopped answering."""
        try:
            if self.shards is not None:
                self.shards.average(rows)
                return True
            host = rows if rows.device.type == "cpu" else rows.cpu()
            torch.distributed.all_reduce(host, group=self.group)
        except RuntimeError as err:
            self._lost(err)
            return False
        if host is not rows:
            rows.copy_(host)
        rows.div_(group_size(self.group))
        return True

    def _all_measure(self) -> bool:
        """Under FSDP2, 'ep' or 'tp': does every rank's watch measure this step? Its extra ``autograd.grad`` calls
        all-gather parameters (FSDP2), run the all-to-all's backward (``ep``) or tensor parallelism's collectives
        (``tp``) in the training's group, which a rank without them would never match. One tiny collective in
        gatewatch's group (with its timeout), and one over the 'tp' ranks, which it leaves out; False, and conflict
        logging off, when a rank does not come."""
        try:
            torch.distributed.all_reduce(torch.ones(1), group=self.group)
            if self.shards is not None and self.shards.tp is not None:
                torch.distributed.all_reduce(torch.ones(1), group=self.shards.parts)
        except RuntimeError as err:
            self._lost(err)
            return False
        return True

    def _lost(self, err: RuntimeError) -> None:
        """A rank stopped answering: drop the step being measured and turn conflict logging off."""
        self._step, self._filled, self._reduced, self._current, self._accumulates = None, False, None, None, False
        self._disable(f"{others(self.group)} stopped answering gatewatch's conflict collective ({type(err).__name__}: "
                      f"{str(err)[:120]}); the conflict figures stop at the last step every rank measured")

    # ------------------------------------------------------------------ helpers
    def _target(self, k: int) -> torch.Tensor:
        """Where this micro-batch's ``[K, M]`` task gradients go: the stack, or a second buffer after the first."""
        assert self.layout is not None
        p0 = self.layout.params[0]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.layout.params) else torch.float32
        if self._stack is None or self._stack.shape != (stack_rows(k), self.layout.size):
            self._stack = torch.empty(stack_rows(k), self.layout.size, dtype=dtype, device=p0.device)
            self._sample = SignSample.plan(self.layout.units, self.layout.group_bounds, k, self._stack)
            self._plan = UnitRuns.plan(self.layout.units, p0.device)
            self._micro, self._before = None, None
        if not self._filled:
            return self._stack[:k]
        if self._micro is None:
            self._micro = torch.empty(k, self.layout.size, dtype=dtype, device=p0.device)
        return self._micro

    def _task_grads(self, loss: torch.Tensor) -> Sequence[torch.Tensor | None]:
        """``loss``'s gradient on each shared parameter (None where it does not reach)."""
        assert self.layout is not None
        params = leaves(self.model, self.layout.params)
        if not loss.requires_grad:
            return [None] * len(params)
        active = [i for i, p in enumerate(params) if p.requires_grad]
        if len(active) == len(params):
            return local_parts(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)
        out: list[torch.Tensor | None] = [None] * len(params)
        if active:
            got = torch.autograd.grad(loss, [params[i] for i in active], retain_graph=True, allow_unused=True)
            for i, grad in zip(active, local_parts(got, [params[i] for i in active]), strict=True):
                out[i] = grad
        return out

    def _flat_grads(self, out: torch.Tensor, grads: Iterable[torch.Tensor | None]) -> torch.Tensor:
        """Write gradients (None: zeros) into the flat row ``out``."""
        layout = self.layout
        assert layout is not None
        if not layout.fused:
            parts = [g.reshape(-1) if g is not None else torch.zeros(layout.numel(i), dtype=out.dtype,
                                                                          device=out.device)
                     for i, g in enumerate(grads)]
            return torch.cat(parts, out=out)
        for i, g in enumerate(grads):  # fused experts: each parameter into its evenly spaced slices
            for view, e in layout.views(out, i):
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g if e is None else g.select(layout.dims[i], e))  # type: ignore[arg-type]
        return out

    def _discover(self, items: list[tuple[str, torch.Tensor]]) -> bool:
        """Find the shared parameters (the first conflict step): every task's gradient, once."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.shared_names is not None:
            wanted = set(self.shared_names)
            named = [(n, p) for n, p in named if n in wanted]
        names, params = [n for n, _ in named], [p for _, p in named]
        used = leaves(self.model, params)
        grads = [local_parts(torch.autograd.grad(loss, used, retain_graph=True, allow_unused=True), used)
                 if loss.requires_grad else [None] * len(params) for _, loss in items]
        reach = [[g is not None for g in task] for task in grads]
        if self.shards is not None and not self._reach_anywhere(reach):
            return False
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
        fused = {name: (d, g.fused.path, g.fused.first) for g in self.gates if g.fused is not None
                 for name, d in g.fused.params.items()}
        args = ([names[i] for i in keep], [params[i] for i in keep], [[r[i] for i in keep] for r in reach],
                self.grouper, self.param_limit)
        try:
            if self.shards is None:
                for i in keep:
                    tensor_split(names[i], used[i], tp=False)  # a DTensor sharded over ranks that are not known
                self.layout = SharedLayout.build(*args, {n: (d, m) for n, (d, m, _) in fused.items()},
                                                 self.expert_groups)
            elif self.shards.ep is None or self._experts_placed():
                names_kept, params_kept, reach_kept, *rest = args
                self.layout = self.shards.layouts(names_kept, params_kept, [used[i] for i in keep], reach_kept,
                                                  *rest, fused, self.expert_groups)
            else:
                return False
        except ConflictError as err:
            self._disable(str(err))
            return False
        position = {n: i for i, n in enumerate(names)}
        order = [position[n] for n in self.layout.param_names]
        self._probe = [[task[i] for i in order] for task in grads]
        return True

    def _reach_anywhere(self, reach: list[list[bool]]) -> bool:
        """Under 'ep': which task reaches which parameter on any rank (every rank then keeps the same shared
        parameters), in place; False, and conflict logging off, when a rank stopped answering."""
        seen = torch.tensor(reach, dtype=torch.int64)
        try:
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX, group=self.group)
        except RuntimeError as err:
            self._lost(err)
            return False
        reach[:] = [[bool(x) for x in task] for task in seen.tolist()]
        return True

    def _experts_placed(self) -> bool:
        """Under 'ep': is every gate's share of experts known on this rank (fused ``[E/ep, ...]`` slices)? Without
        it the expert parameters cannot be told from the replicated ones; conflict logging turns off, saying why."""
        unplaced = {g.name: g.expert_map for g in self.gates if g.fused is None or g.fused.ranks == 1}
        if unplaced:
            name, why = next(iter(unplaced.items()))
            self._disable(f"on a mesh with 'ep' every gate's experts must be placed on their ranks, so that the "
                          f"expert parameters are told from the replicated ones; gate {name!r}: "
                          f"{why or 'it produced no output yet'}")
        return not unplaced

    def _disable(self, why: str) -> None:
        self.disabled = why
        warnings.warn(f"gatewatch: task-conflict logging is off: {why}.", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ flush
    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        pending, self._pending = self._pending, []
        self._collected = [(step, tasks) for step, tasks, _ in pending]
        if not pending:
            return {}
        return {"steps": torch.stack([flat for _, _, flat in pending])}

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        if "steps" not in host or self.written is None:
            return {}
        steps, tasks = [s for s, _ in self._collected], self._collected[0][1]
        assert self.written is not None
        return conflict_tables(steps, tasks, self.written, host["steps"], self.threshold, self._below)

    def describe(self) -> dict[str, Any]:
        return {"conflict": self.settings()}

    def method(self) -> str:
        """How the task gradients are had, in words (run.json)."""
        if not self.exact:
            return "K-1 autograd.grad + subtraction"
        if self.averaged and not self.sharded and type(self.wrapper).__name__ == "DistributedDataParallel":
            return ("K-1 autograd.grad + subtraction from DDP's averaged .grad (autograd.grad per task under "
                    "no_sync() or with .grad not empty)")
        return "autograd.grad per task"

    def settings(self) -> dict[str, Any]:
        """What run.json records about conflict logging."""
        layout = self.written
        out: dict[str, Any] = {
            "schedule": describe(self.schedule), "threshold": self.threshold, "purity_bins": PURITY_BINS,
            "sign_sample": {"from_elements": SAMPLE_FROM, "elements": SAMPLE_SIZE, "seed": SAMPLE_SEED},
            "method": self.method(),
            "disabled": self.disabled, "scope": self.scope,
            **({} if self.shards is None else self.shards.settings()),
        }
        if layout is not None:
            out.update(
                per_param=layout.per_param, tensors=len(layout.param_names), elements=layout.size,
                groups={g: sum(1 for x in layout.group_of if x == i) for i, g in enumerate(layout.groups)},
                shared=layout.param_names if len(layout.param_names) <= SHARED_NAMES_LIMIT else None,
                slices=sum(e is not None for _, e in layout.pieces),
                fused={n: d for n, d in zip(layout.param_names, layout.dims, strict=True) if d is not None},
            )
        return out
