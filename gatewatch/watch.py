"""GateWatch: the one object a training loop touches. It orchestrates; the measuring is done by quantities.

The watch names no quantity: it builds every registered one (``gatewatch.registry``) and calls each through the
``Quantity`` protocol. Per step the quantities only hold or add up device tensors. Every ``every`` steps a window
closes (host bookkeeping only); at a flush (``flush_every`` steps or ``flush_secs`` seconds) the reducer gathers every
quantity's state, reduces it across ranks and moves it to the host in one transfer. That is all a flush does on the
training thread: the writer thread (:mod:`gatewatch.sinks.background`) then has the quantities turn the host copy
into rows, and the sinks (run directory, TensorBoard, the user's own) write them. Decisions taken at the step stay
on the training thread: with ``on_nonfinite="raise"``, or a quantity that decides on each flush's rows (one that
overrides ``Quantity.after``, such as the guard), the rows are made on the training thread and only the writes move.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import meta as run_meta
from .capture import settings
from .capture.distributed import own_group, rank, world_size
from .capture.flush import check_nonfinite, merge, nonfinite_message
from .capture.flush_clock import FlushClock
from .capture.loss_items import Losses, loss_items
from .capture.mesh import check_mesh, counts_tokens, pipeline_stage
from .capture.pipeline import stage_gates
from .capture.quantity import CaptureContext, Quantity
from .capture.reducer import Reducer
from .capture.settings import build_quantities, quantity_keywords
from .gating.discovery import resolve
from .gating.specs import GateDiscoveryError, ResolvedGate
from .schema import frame
from .sinks import Sink
from .sinks.background import BackgroundWriter
from .sinks.fanout import Fanout
from .sinks.live_findings import RecentWindows
from .sinks.run_writer import RunDirWriter
from .sinks.tensorboard import TensorBoardSink
from .wrappers import unwrap

__all__ = ["GateWatch", "Losses", "quantity_keywords"]

WRITE_TIMEOUT_S = 120.0  # close() waits this long for the writer thread
PER_STEP_HOOKS = ("on_losses", "on_step", "on_window", "around_backward")  # the Quantity methods a step may call


class GateWatch:
    """Capture every gate of ``model`` during training and log its health to ``log_dir``.

    Once built it never raises into training (write failures are retried, NaN/Inf is recorded); wrong use
    fails early: bad arguments, a gate output that is not ``[N, E]`` probabilities, losses that do not match
    ``tasks``, any call after :meth:`close`, two open watches on one folder (docs/reliability.md).

    Args:
        model: the model (a DDP/FSDP wrapper is unwrapped).
        tasks: task names, in the order of the model's outputs / losses. Used to match gates to tasks.
        gates: None (discover), ``{name: spec}`` or ``[spec, ...]``; a spec is a dotted module path,
            an ``nn.Module`` or a :class:`~gatewatch.Gate`.
        log_dir: the run directory (created); the source of truth.
        every: steps per statistics window (one row per gate per window).
        flush_every, flush_secs: write to disk after this many steps or this many seconds since the last
            write, whichever comes first (``flush_secs=None``: steps only).
        tensorboard: also write TensorBoard events under ``log_dir/tensorboard``.
        threshold: a sample is polarized when its top gate weight is at least this.
        bins: bins of the gate-weight histogram over [0, 1].
        margin: top-k routers: a token is "close" when its k-th and (k+1)-th weights differ by less.
        config: any JSON-safe metadata to store in ``run.json`` (hyper-parameters, data set ...).
        on_nonfinite: NaN/Inf in a gate or a loss: ``"warn"``, ``"ignore"``, or ``"raise"``
            (:class:`~gatewatch.NonFiniteGateError` at the next flush); always in the ``events`` table.
        sinks: more :class:`~gatewatch.sinks.Sink` objects to write to (rank 0 only).
        durable: fsync every file written to the run directory (power-loss safety; costs a few ms a flush).
        mesh: the ``DeviceMesh`` of a parallel layout, with named dimensions: token statistics add up over
            ``dp``, ``dp_replicate``, ``dp_shard``, ``cp`` and ``ep``, and count a token once over ``tp``; over
            ``pp`` each stage measures the gates it holds and rank 0 writes every stage's (docs/distributed.md).
            None: every rank holds its own tokens (DDP, FSDP2 alone).
        write_in_background: make the rows and write them (run directory, TensorBoard, ``sinks``) on a writer thread
            of the watch's own, so that a flush costs the training thread only the reduction and the copy to the
            host (docs/reliability.md). False: everything runs on the training thread, and an error in a sink or a
            quantity's rows raises where it happens (for debugging).
        **options: the quantities' own keywords; ``gatewatch.capture.settings.quantity_keywords()`` lists them
            with their defaults. Those that ship: gradient conflict ``conflict_every`` (steps, a schedule
            ``step -> bool``, or 0: off), ``shared``, ``conflict_threshold``, ``conflict_group``,
            ``conflict_param_limit`` (docs/conflict.md); the conflict proxy ``conflict_proxy``, ``towers``;
            the guard ``guard`` (docs/guard.md); expert similarity ``similarity_every``, ``similarity_rows``,
            ``similarity_top``, ``similarity_full_every`` (docs/similarity.md).

    Each registered quantity is reached as an attribute by its registry name (``watch.conflict``,
    ``watch.guard``; None when it is off), or with :meth:`quantity`.
    """

    def __init__(
        self, model: nn.Module, *, tasks: Sequence[str] | None = None,
        gates: Mapping[str, Any] | Sequence[Any] | None = None, log_dir: str | os.PathLike[str], every: int = 10,
        flush_every: int = 100, flush_secs: float | None = 5.0, tensorboard: bool = True, threshold: float = 0.9,
        bins: int = 20, margin: float = 0.05, config: Mapping[str, Any] | None = None, on_nonfinite: str = "warn",
        sinks: Sequence[Sink] = (), durable: bool = False, mesh: Any = None, write_in_background: bool = True,
        **options: Any,
    ) -> None:
        st = settings.check(model, tasks=tasks, every=every, flush_every=flush_every, flush_secs=flush_secs,
                            threshold=threshold, bins=bins, margin=margin, on_nonfinite=on_nonfinite, options=options)
        self.model, self.tasks, self.on_nonfinite, self.every, self.flush_every = (
            model, st.tasks, on_nonfinite, st.every, st.flush_every)
        self.log_dir, self.rank, self.closed, self.closing = Path(log_dir), rank(), False, False
        distributed = world_size() > 1
        if mesh is not None:
            check_mesh(mesh)
        group = own_group() if distributed else None
        stage = None if mesh is None else pipeline_stage(mesh)
        self.ctx = CaptureContext(model, st.tasks, _resolve(model, st.tasks, gates, stage, group), st.every,
                                  threshold, st.bins, margin, distributed, options=st.options, mesh=mesh)
        run_meta.claim(self.log_dir, self, writer=self.rank == 0)
        self._by_name = build_quantities(self.ctx)  # registry name -> quantity (None: off)
        self.quantities: list[Quantity] = [q for q in self._by_name.values() if q is not None]
        # per hook of the training loop, the quantities that act on it (a step calls no empty method)
        self._acting = {hook: [q for q in self.quantities if getattr(type(q), hook) is not getattr(Quantity, hook)]
                        for hook in PER_STEP_HOOKS}
        self.reducer = Reducer(self.quantities, distributed=distributed, group=group,
                               counts=mesh is None or counts_tokens(mesh), varied=stage is not None)
        self.clock = FlushClock(self.flush_every, flush_secs, distributed=distributed)
        self.sinks: list[Sink] = []
        if self.rank == 0:
            self.sinks = [RunDirWriter(self.log_dir, durable=durable),
                          *([TensorBoardSink(self.log_dir / "tensorboard")] if tensorboard else []), *sinks]
        recent = RecentWindows() if any(s.wants_findings for s in self.sinks) else None
        self.writes = BackgroundWriter(threaded=bool(write_in_background), name=f"gatewatch-writer:{self.log_dir.name}")
        self._fanout = Fanout(self.sinks, self.log_dir, self.writes.tell, recent, strict=not write_in_background)
        self._deadline: float | None = None  # while closing: when the writer's time is up (time.monotonic())
        # rows made on the training thread: a step-time decision needs them (on_nonfinite="raise", Quantity.after)
        self._rows_inline = on_nonfinite == "raise" or any(type(q).after is not Quantity.after for q in self.quantities)
        self.meta = run_meta.initial_meta(self.log_dir.name, unwrap(model), st.recorded(), config, world_size(),
                                          [name for name, q in self._by_name.items() if q is not None])
        self._windows: list[int] = []  # last steps of the windows closed since the last flush
        self._last_window = 0
        # the first run.json, and the trackers' runs, start on the calling thread (MLflow's active run is per thread)
        self._fanout.write_meta(self._meta_now())

    # ------------------------------------------------------------------ what loops and integrations use
    def quantity(self, name: str) -> Quantity | None:
        """The quantity registered as ``name`` (``"conflict"``, ``"my_pkg.my_quantity"`` ...); None when it is off."""
        if name not in self._by_name:
            raise KeyError(f"No quantity is registered as {name!r}; the registered ones are {list(self._by_name)}.")
        return self._by_name[name]

    def __getattr__(self, name: str) -> Any:
        by_name = self.__dict__.get("_by_name")  # absent while __init__ runs
        if by_name is None or name not in by_name:
            raise AttributeError(f"GateWatch has no attribute {name!r}" + (
                f" (the quantities are {list(by_name)})" if by_name else ""))
        return by_name[name]

    @property
    def gates(self) -> list[ResolvedGate]:
        return self.ctx.gates

    @property
    def step_count(self) -> int:
        """Optimizer steps so far (``step()`` calls)."""
        return self.ctx.step

    @property
    def writer(self) -> RunDirWriter | None:
        """The run-directory sink (None on ranks other than 0)."""
        return next((s for s in self.sinks if isinstance(s, RunDirWriter)), None)

    def log_losses(self, losses: Losses) -> torch.Tensor:
        """Record this step's task losses and return their sum (on the graph), for a backward you run yourself:
        ``scaler.scale(watch.log_losses(losses)).backward()`` (with ``conflict_every``: :meth:`task_gradients`)."""
        self._check_open()
        return self._record(losses)[1]

    def _record(self, losses: Losses) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        items, total = loss_items(self.ctx, losses)
        for q in self._acting["on_losses"]:
            q.on_losses(items, self.step_count + 1)
        return items, total

    def batch(self, **inputs: Any) -> AbstractContextManager[None]:
        """Hand per-batch inputs that only the loop knows to the quantities that read them (their ``batch_keys``)::

            with watch.batch(sample_groups=labels):
                out = model(x)

        They stand until the next ``batch()`` call, so a forward recomputed during the backward (activation
        checkpointing) and gradient hooks still see them. A keyword no quantity of this watch reads raises."""
        self._check_open()
        known = sorted({k for q in self.quantities for k in q.batch_keys})
        if unknown := sorted(set(inputs) - set(known)):
            raise TypeError(f"watch.batch() got {unknown}, which no quantity of this watch reads; they read "
                            f"{known or 'nothing'} (a quantity's batch_keys; one that is off reads nothing).")
        for q in self.quantities:
            if q.batch_keys:
                q.on_batch({k: inputs[k] for k in q.batch_keys if k in inputs})
        return nullcontext()

    def grouped(self, labels: Any) -> AbstractContextManager[None]:
        """Label the rows of the coming forward with their sample groups (``GateWatch(..., sample_groups=[...])``)::

            with watch.grouped(labels):
                out = model(x)

        ``labels``: an integer tensor ``[B]`` (one group per sample or sequence) or ``[B, S]`` (one per token)
        indexing ``sample_groups``; ``-1`` leaves a row out. The same as ``watch.batch(sample_groups=labels)``:
        the labels stand until the next call."""
        return self.batch(sample_groups=labels)

    def backward(self, losses: Losses, **backward_kwargs: Any) -> torch.Tensor:
        """Backpropagate the sum of the task losses, exactly as ``sum(losses).backward()`` would (on a conflict
        step it also measures each task's gradient on the shared parameters; ``.grad`` is the same)."""
        with self.task_gradients(losses) as total:
            total.backward(**backward_kwargs)
        return total.detach()

    @property
    def conflict_due(self) -> bool:
        """True when the coming backward is on a step where some quantity measures around the backward (the
        gradient conflict's ``conflict_every``)."""
        return any(q.backward_due(self.step_count + 1) for q in self.quantities)

    @contextmanager
    def task_gradients(self, losses: Losses) -> Iterator[torch.Tensor]:
        """Record the task losses and yield their sum for a backward you run yourself inside the block.

        On a conflict step the task gradients are measured around your backward (AMP's loss scale and
        1 / accumulation are read from the graph). ::

            with watch.task_gradients(losses) as total:
                scaler.scale(total).backward()
        """
        self._check_open()
        items, total = self._record(losses)
        with ExitStack() as around:
            for q in self._acting["around_backward"]:
                around.enter_context(q.around_backward(items, total, self.step_count + 1))
            yield total

    def log_metrics(self, step: int, metrics: Mapping[str, Mapping[str, float]], *, split: str = "val") -> None:
        """Record evaluation metrics, ``{task: {metric: value}}`` (validation AUC, say), at ``step``."""
        self._check_open()
        rows = [{"step": int(step), "split": split, "task": str(t), "metric": str(m), "value": float(v)}
                for t, values in metrics.items() for m, v in values.items()]
        self.writes.submit(f"the evaluation metrics of step {int(step)}",
                           lambda: self._fanout.write({"eval": frame("eval", rows)}))

    def annotate(self, **fields: Any) -> None:
        """Store JSON-safe ``fields`` in run.json (written at the next flush and at close)."""
        self.meta.update(fields)

    # ------------------------------------------------------------------ schedule
    def step(self) -> None:
        """Call once per optimizer step, after it."""
        self._check_open()
        self._warn_news()
        step = self.ctx.step = self.ctx.step + 1
        for q in self._acting["on_step"]:
            q.on_step(step)
        if step % self.every == 0:
            self._close_window()
        if self.clock.due(step):
            self.flush()

    def _close_window(self) -> None:
        self._windows.append(self.ctx.step)
        self._last_window = self.ctx.step
        for q in self._acting["on_window"]:
            q.on_window(self.ctx.step)

    def flush(self, *, wait: bool = False) -> None:
        """Reduce the closed windows (across ranks too: every rank must call it at the same steps, as ``step()``
        does) and hand them to the writer thread, which writes them through every sink and refreshes the
        heartbeat. One flush at a time: a flush first waits for the last one to be written. ``wait``: return once
        everything handed over so far is written."""
        limit = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        self.writes.wait_for_flush(limit)  # the quantities' rows of the last flush are made: their state may change
        windows, self._windows = self._windows, []
        idle = not windows and self.clock.last_step == self.ctx.step  # e.g. close() right after a flush: no collective
        proposal = [self.clock.propose(self.ctx.step) if self.rank == 0 else 0.0] if self.ctx.distributed else []
        host, control = self.reducer.reduce(windows, proposal, local=idle)
        self.clock.flushed(self.ctx.step, control[0] if control else None)
        events = self.reducer.news(windows[0] if windows else self.ctx.step)
        meta, closing = self._meta_now(), self.closing
        what = f"the flush of steps {windows[0]}..{windows[-1]}" if windows else f"run.json at step {self.ctx.step}"
        if self._rows_inline:
            tables = self._tables(windows, host, events)
            self.writes.submit(what, lambda: self._fanout.flush(tables, meta, closing=closing), flush=True,
                               timeout=limit)
            check_nonfinite(tables["events"], self.on_nonfinite)
        else:
            def write() -> None:
                tables = self._tables(windows, host, events)
                self._fanout.flush(tables, meta, closing=closing)
                if self.on_nonfinite == "warn" and (message := nonfinite_message(tables["events"])):
                    self.writes.tell(f"gatewatch: {message}")

            self.writes.submit(what, write, flush=True, timeout=limit)
        if wait:
            self.writes.drain()
            self._warn_news()

    def _tables(self, windows: list[int], host: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
        """The rows of one flush from its host copy (on the writer thread unless ``_rows_inline``)."""
        parts = [q.rows(windows, host.get(q.name, {})) for q in self.quantities]
        tables = merge([*parts, {"events": events}])
        if self._rows_inline:
            tables = merge([tables, *(q.after(tables) for q in self.quantities)])
        return tables

    def _meta_now(self, **fields: Any) -> dict[str, Any]:
        """run.json as it stands now, a copy of its own for the writer thread (the heartbeat is stamped when it is
        written)."""
        run_meta.refresh(self.meta, self.quantities, steps=self.ctx.step, tasks=self.tasks or self.ctx.loss_tasks,
                         step_time=self.clock.step_time, ranks_partial=self.reducer.degraded or None,
                         writes=self.writes.stats(), **fields)
        return copy.deepcopy(self.meta)

    def _warn_news(self) -> None:
        """Warn, on the training thread, what the writer thread could not do (and NaN/Inf it found)."""
        for message in self.writes.news():
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ lifecycle
    def close(self, *, error: BaseException | None = None, timeout: float = WRITE_TIMEOUT_S) -> None:
        """Write what is left, mark the run finished (or crashed), and remove every hook. Under DDP it waits at
        most ``CLOSE_TIMEOUT_S`` for the other ranks; ranks that stopped elsewhere are named in a warning. The
        writer thread gets at most ``timeout`` seconds to write what it was handed; a warning names what it did
        not write (a sink stuck in a call)."""
        if self.closed:
            return
        self._deadline = time.monotonic() + timeout  # a stuck sink: the last flush is handed over all the same
        # the flushes handed over before close() are made into rows before the quantities learn that the run closes
        # (a quantity's rows may keep the run's last window; see gatewatch.capture.per_expert)
        self.writes.drain(timeout)
        self.closing = self.ctx.closing = True  # the last flush evaluates the findings whatever their schedule
        try:
            for q in self.quantities:
                q.on_close()
            for q in self._acting["on_step"]:
                q.on_step(self.ctx.step)  # what ran after the last step() joins the last window
            # under DDP only the (shared) step count decides, so that every rank closes the same windows;
            # losses logged after the last step() are then left out, rather than some ranks waiting forever
            late = any(q.late() for q in self.quantities) and not self.ctx.distributed
            if self.ctx.step > self._last_window or late:
                self._close_window()
            self.reducer.settle_close(self.ctx.step)
            self.flush()
        finally:
            self.closed = True
            for q in self.quantities:
                q.detach()
            self.meta.update(status="finished" if error is None else "crashed", ended=run_meta.now(),
                             error=None if error is None else f"{type(error).__name__}: {error}")
            meta = self._meta_now()
            self.writes.submit("the close of the sinks and the final run.json", lambda: self._fanout.close(meta))
            lost = self.writes.close(max(0.0, self._deadline - time.monotonic()))
            self._warn_news()
            if lost:
                warnings.warn(f"gatewatch could not finish writing {self.log_dir} within {timeout:g} s; not written: "
                              f"{'; '.join(lost)}.", RuntimeWarning, stacklevel=2)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("This GateWatch is closed (its hooks are removed). Create a new GateWatch to keep "
                               "monitoring.")

    def __enter__(self) -> GateWatch:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(error=exc)

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            warnings.warn("GateWatch was not closed; call watch.close() to write the last window.",
                          ResourceWarning, stacklevel=1)


def _resolve(model: nn.Module, tasks: list[str] | None, gates: Any, stage: int | None, group: object
             ) -> list[ResolvedGate]:
    """The gates of ``model``; on a pipeline stage, every stage's gates (:mod:`gatewatch.capture.pipeline`), where a
    stage may hold none."""
    if stage is None:
        return resolve(model, tasks, gates)
    try:
        local = resolve(model, tasks, gates)
    except GateDiscoveryError as err:
        if gates is None:  # discovery found none: this stage holds no gate
            return stage_gates([], stage, group, none_found=err)
        return stage_gates([], stage, group, failed=err)
    return stage_gates(local, stage, group)

