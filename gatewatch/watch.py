"""GateWatch: the one object a training loop touches.

Per step it only folds the captured gate outputs into on-device window sums. Every ``every`` steps
the window is closed (a device copy, no transfer); every ``flush_every`` steps the closed windows
go to the host in one transfer, become tidy rows, and are written to the run directory and
TensorBoard.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .accumulators import GateAccumulator, Snapshot, agree_counts, decode, reduce_windows, relayout, to_host
from .conflict import PARAM_ROW_LIMIT, ConflictError, ConflictMonitor, GroupSpec, SharedSpec
from .functional import NO_STEP, Layout, js_divergence, window_metrics
from .gates import GateOutputError, NonFiniteGateError, ResolvedGate, resolve, unwrap
from .schedules import Schedule, as_schedule
from .schema import RUN_FORMAT, frame
from .sinks.run_dir import RunDirWriter
from .sinks.tensorboard import TensorBoardSink

Losses = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
ON_NONFINITE = ("warn", "ignore", "raise")
HOLD_ELEMENTS = 4_000_000  # gate outputs held until their window closes (16 MB of float32); above: fold early
NONFINITE_EVENTS = ("nonfinite", "nonfinite_loss")

# The open watches of this process by run directory: two open watches must not write one folder.
_OPEN_WATCHES: weakref.WeakValueDictionary[str, GateWatch] = weakref.WeakValueDictionary()


def _dir_key(log_dir: Path) -> str:
    return str(log_dir.expanduser().resolve())


def _claim_log_dir(log_dir: Path) -> None:
    """Refuse a folder another open watch of this process writes; warn when it already holds a run."""
    other = _OPEN_WATCHES.get(_dir_key(log_dir))
    if other is not None and not other.closed:
        raise ValueError(
            f"Another GateWatch that is still open writes to {log_dir}. Close it first (watch.close()), or give "
            "this one its own log_dir."
        )
    if (log_dir / "run.json").is_file() and _rank() == 0:
        warnings.warn(
            f"{log_dir} already holds a run; the new rows are added to it and their steps count from 1 again. "
            "Give each run (and each resumed run) its own log_dir to keep them apart.", UserWarning, stacklevel=3,
        )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (steps), got {value!r}.")
    return value


class GateWatch:
    """Capture every gate of ``model`` during training and log its health to ``log_dir``.

    Nothing it does raises into the training loop once it is built: write failures are warned about
    once and retried, NaN/Inf is recorded (see ``on_nonfinite``). Wrong use fails early instead: bad
    arguments here, a gate output that is not ``[N, E]`` probabilities at the first forward, losses
    that do not match ``tasks`` at the first ``backward``, any call after :meth:`close`. Several
    watches may observe one model, each with its own hooks and ``log_dir`` (two open watches on one
    folder are refused); closing one leaves the others running, and a closed watch stays closed: to
    go on, create a new one (docs/reliability.md).

    Args:
        model: the model (a DDP/FSDP wrapper is unwrapped).
        tasks: task names, in the order of the model's outputs / losses. Used to match gates to tasks.
        gates: None (discover), ``{name: spec}`` or ``[spec, ...]``; a spec is a dotted module path,
            an ``nn.Module`` or a :class:`~gatewatch.Gate`.
        log_dir: the run directory (created).
        every: steps per statistics window (one row per gate per window).
        flush_every: steps between writes to disk (and the one device-to-host transfer).
        tensorboard: also write TensorBoard events under ``log_dir/tensorboard``.
        threshold: a sample is polarized when its top gate weight is at least this.
        bins: bins of the gate-weight histogram over [0, 1].
        margin: top-k routers: a token's routing is "close" when its k-th and (k+1)-th weights differ
            by less than this.
        config: any JSON-safe metadata to store in ``run.json`` (hyper-parameters, data set ...).
        conflict_every: measure gradient conflict between tasks every this many steps (0: off), or a
            callable ``step -> bool`` (steps count from 1). See ``docs/conflict.md``.
        shared: the parameters to compare tasks on: names, name prefixes or modules. None: those that
            receive gradient from two or more tasks, found on the first conflict step.
        conflict_threshold: Recon's S in (-1, 0]: the ``below`` count adds a step when the cosine is below it.
        conflict_group: how shared tensors roll up into modules: None (the owning module, an
            ``nn.Sequential`` counting as one: an expert, a layer), a module-path depth, or a callable
            ``name -> group``.
        conflict_param_limit: log one row per shared tensor only up to this many tensors (modules and
            "all" are always logged).
        on_nonfinite: what to do when NaN/Inf first reaches a gate output or a task loss: ``"warn"`` (a
            RuntimeWarning), ``"ignore"``, or ``"raise"`` (:class:`~gatewatch.NonFiniteGateError`, a hard
            stop). It is always recorded in the ``events`` table. Detection happens at a flush (no host
            sync per step), so the hard stop fires at the first flush after the bad step.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tasks: Sequence[str] | None = None,
        gates: Mapping[str, Any] | Sequence[Any] | None = None,
        log_dir: str | os.PathLike[str],
        every: int = 10,
        flush_every: int = 100,
        tensorboard: bool = True,
        threshold: float = 0.9,
        bins: int = 20,
        margin: float = 0.05,
        config: Mapping[str, Any] | None = None,
        conflict_every: int | Schedule = 0,
        shared: SharedSpec = None,
        conflict_threshold: float = 0.0,
        conflict_group: GroupSpec = None,
        conflict_param_limit: int = PARAM_ROW_LIMIT,
        on_nonfinite: str = "warn",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GateWatch needs an nn.Module, got {type(model).__name__}.")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}.")
        self.on_nonfinite = on_nonfinite
        self.every = _positive_int("every", every)
        self.flush_every = _positive_int("flush_every", flush_every)
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold is a gate weight in (0, 1], got {threshold}.")
        self.bins = _positive_int("bins", bins)
        if tasks is not None:
            tasks = [str(t) for t in tasks]
            if len(set(tasks)) != len(tasks) or not tasks:
                raise ValueError(f"tasks must be distinct, non-empty names; got {tasks}.")
        self.model = model
        self.tasks: list[str] | None = tasks
        self.threshold, self.margin = threshold, margin
        self.gates: list[ResolvedGate] = resolve(model, tasks, gates)
        self.log_dir = Path(log_dir)
        _claim_log_dir(self.log_dir)
        self.step_count = 0
        self.closed = False
        self._pending: list[tuple[int, torch.Tensor]] = []  # this step's gate outputs: (gate index, probs)
        self._held: list[tuple[int, int, torch.Tensor]] = []  # earlier steps of the window: (step, gate, probs)
        self._held_elements = 0
        self._windows: list[tuple[Snapshot, int]] = []
        self._loss_sum: torch.Tensor | None = None
        self._loss_calls = 0
        self._loss_first_bad: torch.Tensor | None = None  # first step with a non-finite loss, per task
        self._loss_tasks: list[str] | None = list(tasks) if tasks else None
        self._prev_share: dict[str, torch.Tensor] = {}
        self._nonfinite_seen: set[str] = set()
        self._window_start = 0
        self._layout_agreed = False  # under torch.distributed: see _shared_layout
        self.acc = GateAccumulator([g.top_k for g in self.gates], threshold=threshold, bins=bins, margin=margin)
        self.rank = _rank()
        self.writer = RunDirWriter(self.log_dir) if self.rank == 0 else None
        self.tb = TensorBoardSink(self.log_dir / "tensorboard") if tensorboard and self.rank == 0 else None
        self._handles = [g.module.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]
        self.conflict = _conflict_monitor(model, tasks, conflict_every, shared, conflict_threshold, conflict_group,
                                          conflict_param_limit)
        self.meta = self._initial_meta(config)
        self._write_meta()
        _OPEN_WATCHES[_dir_key(self.log_dir)] = self

    # ------------------------------------------------------------------ capture
    def _hook(self, index: int) -> Callable[..., None]:
        gate = self.gates[index]

        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if not module.training or self.closed:
                return
            p = gate.to_probs(output)
            if gate.n_experts is None:
                self._first_output(gate, p)
            self._pending.append((index, p))
            self._held_elements += p.numel()
            if self._held_elements > HOLD_ELEMENTS or len(self._pending) > 64 * len(self.gates):
                self._fold()  # big outputs, or forward passes without step(): stay bounded

        return hook

    def _first_output(self, gate: ResolvedGate, p: torch.Tensor) -> None:
        """Check a gate's first output once (one host sync) and record its expert count."""
        if gate.output == "probs":
            rows = p.sum(-1)
            rows = rows[torch.isfinite(rows)]
            # 1e-2: a bfloat16 softmax (CPU autocast) sums to 1 only within ~4e-3; logits are far further off
            if rows.numel() and ((rows - 1).abs().max() > 1e-2 or (p[torch.isfinite(p)] < 0).any()):
                raise GateOutputError(
                    f"Gate {gate.name!r} ({gate.path}) output rows sum to {float(rows.min()):.4g}.."
                    f"{float(rows.max()):.4g}, not 1: it does not look like probabilities. If the module emits "
                    f'logits (softmax applied later), pass gw.Gate("{gate.path}", output="logits").'
                )
        self._set_experts(gate, p.shape[-1])

    def _set_experts(self, gate: ResolvedGate, e: int) -> None:
        """Record a gate's expert count (from its output, or from another rank) and label its experts."""
        if gate.experts is not None and len(gate.experts) != e:
            raise GateOutputError(
                f"Gate {gate.name!r} has {e} outputs but {len(gate.experts)} expert names were given."
            )
        if gate.experts is None and gate.task is None and sum(g.task is None for g in self.gates) > 1:
            gate.experts = [f"{gate.name}:{i}" for i in range(e)]  # task-less gates (layers) own their experts
        gate.n_experts = e
        self._write_meta()

    def _hold(self) -> None:
        """Keep this step's gate outputs until the window closes (references, no copy, no op)."""
        step = self.step_count + 1
        self._held += [(step, index, p) for index, p in self._pending]
        self._pending = []

    def _fold(self) -> None:
        """Fold every held gate output into the window sums: outputs of the same shape, from all steps of
        the window, are stacked and reduced in one pass, so the ops run once per window, not per step."""
        self._hold()
        held, self._held, self._held_elements = self._held, [], 0
        groups: dict[tuple[Any, ...], list[tuple[int, int, torch.Tensor]]] = {}
        for step, index, p in held:
            groups.setdefault((tuple(p.shape), p.device, p.dtype), []).append((step, index, p))
        for items in groups.values():
            first = items[0][0]
            stacked = items[0][2].unsqueeze(0) if len(items) == 1 else torch.stack([p for _, _, p in items])
            self.acc.add([i for _, i, _ in items], stacked, first, tuple(s - first for s, _, _ in items))

    # ------------------------------------------------------------------ losses
    def _loss_items(self, losses: Losses) -> list[tuple[str, torch.Tensor]]:
        items = self._named_losses(losses)
        for task, loss in items:
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(
                    f"The loss of task {task!r} is {shape}, not a scalar tensor: reduce it first "
                    "(e.g. loss.mean()) and pass one scalar loss per task."
                )
        return items

    def _named_losses(self, losses: Losses) -> list[tuple[str, torch.Tensor]]:
        if isinstance(losses, Mapping):
            names = [str(k) for k in losses]
            if self._loss_tasks is None:
                self._loss_tasks = names
            if set(names) != set(self._loss_tasks):
                raise ValueError(
                    f"losses has tasks {sorted(names)} but the watch expects {self._loss_tasks}: pass one loss "
                    "per task, keyed by the task names given to GateWatch(tasks=...)."
                )
            return [(t, losses[t]) for t in self._loss_tasks]
        items = list(losses)
        if self._loss_tasks is None:
            self._loss_tasks = [f"task{i}" for i in range(len(items))]
        if len(items) != len(self._loss_tasks):
            raise ValueError(f"Got {len(items)} losses for tasks {self._loss_tasks}; pass one per task.")
        return list(zip(self._loss_tasks, items, strict=True))

    def log_losses(self, losses: Losses) -> torch.Tensor:
        """Record the task losses of this step and return their sum (still attached to the graph).

        Use it instead of :meth:`backward` when you run the backward pass yourself, e.g. with AMP:
        ``scaler.scale(watch.log_losses(losses)).backward()``. With ``conflict_every``, use
        :meth:`task_gradients` instead, so that conflict steps are measured.
        """
        return self._record_losses(losses)[1]

    def _record_losses(self, losses: Losses) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        """Check and record the task losses; return them in task order and their sum."""
        self._check_open()
        items = self._loss_items(losses)
        values = torch.stack([loss.detach().float().reshape(()) for _, loss in items])
        self._loss_sum = values if self._loss_sum is None else self._loss_sum + values.to(self._loss_sum)
        at = torch.where(torch.isfinite(values), NO_STEP, self.step_count + 1)  # no host sync
        self._loss_first_bad = at if self._loss_first_bad is None else torch.minimum(self._loss_first_bad, at)
        self._loss_calls += 1
        total = items[0][1]
        for _, loss in items[1:]:
            total = total + loss
        return items, total

    def backward(self, losses: Losses, **backward_kwargs: Any) -> torch.Tensor:
        """Backpropagate the sum of the task losses, exactly as ``sum(losses).backward()`` would.

        On a conflict step (``conflict_every``) it also measures each task's gradient on the shared
        parameters; the model's ``.grad`` is the same either way.
        """
        if self.conflict_due:
            with self.task_gradients(losses) as total:
                total.backward(**backward_kwargs)
            return total.detach()
        total = self.log_losses(losses)
        total.backward(**backward_kwargs)
        return total.detach()

    @property
    def conflict_due(self) -> bool:
        """True when the coming backward is on a conflict step (see ``conflict_every``)."""
        return self.conflict is not None and self.conflict.due(self.step_count + 1)

    @contextmanager
    def task_gradients(self, losses: Losses) -> Iterator[torch.Tensor]:
        """Record the task losses and yield their sum for a backward you run yourself inside the block.

        On a conflict step it first computes the task gradients that your backward cannot give, and
        after the block it takes the last task's from ``.grad``; on other steps it only records the
        losses. A ``.grad`` already there (gradient accumulation) is allowed for, and the gradients of
        the micro-batches of one step add up. A factor your backward applies to ``total`` (AMP's loss
        scale, 1 / accumulation steps) is read from the gradient reaching ``total``: the figures are
        those of the task losses as passed. ::

            with watch.task_gradients(losses) as total:
                scaler.scale(total).backward()
        """
        items, total = self._record_losses(losses)
        conflict = self.conflict
        measuring = conflict is not None and self.conflict_due and conflict.before_backward(
            items, total, self.step_count + 1)
        try:
            yield total
        except BaseException:
            if measuring and conflict is not None:
                conflict.abort()
            raise
        if measuring and conflict is not None:
            conflict.after_backward()

    # ------------------------------------------------------------------ schedule
    def step(self) -> None:
        """Call once per optimizer step, after it."""
        self._check_open()
        self._hold()
        self.step_count += 1
        if self.conflict is not None:
            self.conflict.end_step()
        if self.step_count % self.every == 0:
            self._close_window()
        if self.step_count % self.flush_every == 0:
            self.flush()

    def _close_window(self) -> None:
        self._fold()
        extra = self._loss_sum
        snap = self.acc.snapshot(self.step_count, extra=extra)
        if snap is None and _world_size() > 1:  # every rank keeps every window, so their flushes line up
            snap = Snapshot(self.step_count, [], torch.zeros(0, dtype=torch.float64))
        if snap is not None:
            self._windows.append((snap, self._loss_calls if extra is not None else 0))
        self._loss_sum, self._loss_calls = None, 0
        self._window_start = self.step_count

    def flush(self) -> None:
        """Move the closed windows to the host (one transfer) and write them out.

        Under torch.distributed every rank must call it at the same steps (``step()`` does): the windows
        of all ranks are added up (see :meth:`_reduce`) and rank 0 writes them.
        """
        windows, self._windows = self._windows, []
        if _world_size() > 1 and windows:
            windows, hosts = self._reduce(windows)
        else:
            hosts = to_host([snap for snap, _ in windows])
        tables = self._tables(windows, hosts)
        if self.conflict is not None:
            tables.update(self.conflict.tables())
        if self.writer is not None:
            self.writer.write(tables)
            self._write_meta()
        if self.tb is not None:
            self.tb.write(tables)
        self._report_nonfinite(tables["events"])

    def _report_nonfinite(self, events: Any) -> None:
        """Warn about (or stop on, see ``on_nonfinite``) the NaN/Inf first seen in this flush."""
        bad = events[events["kind"].isin(NONFINITE_EVENTS)] if len(events) else events
        if not len(bad) or self.on_nonfinite == "ignore":
            return
        text = "; ".join(m.rstrip(".") for m in bad["message"].astype(str)) + "."
        if self.on_nonfinite == "raise":
            raise NonFiniteGateError(f"gatewatch stops training (on_nonfinite='raise'): {text}")
        warnings.warn(f"gatewatch: {text}", RuntimeWarning, stacklevel=3)

    def _reduce(self, windows: list[tuple[Snapshot, int]]) -> tuple[list[tuple[Snapshot, int]], list[torch.Tensor]]:
        """Add the windows up across ranks, with one all_reduce for all of them.

        A second, tiny min-reduce of the first non-finite steps runs only when some rank saw NaN/Inf.
        Returns the windows one process that saw every rank's batches would have closed: sample sums
        added, loss sums and loss calls added (so the mean loss is over ranks and steps).
        """
        layout = self._shared_layout()
        n_loss = len(self._loss_tasks or [])
        device = next((snap.flat.device for snap, _ in windows if snap.flat.numel()), torch.device("cpu"))
        parts = [relayout(snap, layout, n_loss) for snap, _ in windows]
        calls = torch.tensor([[float(c)] for _, c in windows], dtype=torch.float64, device=device)
        summed = torch.cat([torch.stack([s.to(device) for s, _ in parts]), calls], dim=1)
        n_bad, at = [], 0
        for _, lay in layout:
            n_bad.append(at + lay.slices()["n_bad"].start)
            at += lay.size
        host, first_bad = reduce_windows(summed, torch.stack([b.to(device) for _, b in parts]), n_bad)
        reduced: list[tuple[Snapshot, int]] = []
        for (snap, _), row, bad in zip(windows, host, first_bad, strict=True):
            flat = torch.cat([row[:at], bad, row[at : at + n_loss]])  # the layout decode() reads
            reduced.append((Snapshot(snap.step, layout, flat), int(row[-1])))
        return reduced, [snap.flat for snap, _ in reduced]

    def _shared_layout(self) -> list[tuple[int, Layout]]:
        """Every gate that some rank has seen, in gate order: the same list on every rank.

        Until every gate's expert count and the loss tasks are known everywhere, each flush agrees on
        them first (one tiny collective); ranks that never saw a gate learn its expert count here.
        """
        if not self._layout_agreed:
            counts = [g.n_experts or 0 for g in self.gates] + [len(self._loss_tasks or [])]
            high, low = agree_counts(counts)
            names = [g.name for g in self.gates] + ["(number of task losses)"]
            differ = [f"{n}: {lo} vs {hi}" for n, hi, lo in zip(names, high, low, strict=True) if hi and hi != lo]
            if differ:
                raise GateOutputError(f"Ranks disagree on expert counts / loss tasks ({', '.join(differ)}): "
                                      "every rank must run the same model and log the same task losses.")
            for gate, e in zip(self.gates, high, strict=False):
                if e and gate.n_experts is None:
                    self._set_experts(gate, e)
            if high[-1] and self._loss_tasks is None:
                self._loss_tasks = [f"task{i}" for i in range(high[-1])]
            self._layout_agreed = all(high)
        return [(i, Layout(g.n_experts, self.bins)) for i, g in enumerate(self.gates) if g.n_experts]

    # ------------------------------------------------------------------ rows
    def _tables(self, windows: list[tuple[Snapshot, int]], hosts: list[torch.Tensor]) -> dict[str, Any]:
        names = ("gates", "shares", "hist", "experts", "losses", "events")
        rows: dict[str, list[dict[str, Any]]] = {t: [] for t in names}
        for (snap, loss_calls), flat in zip(windows, hosts, strict=True):
            n_loss = len(self._loss_tasks or []) if loss_calls else 0
            sums, first_bad, loss_sums = decode(snap, flat, n_loss)
            per_gate = {gid: self._gate_rows(snap.step, self.gates[gid], layout, sums[gid], first_bad[gid], rows)
                        for gid, layout in snap.layout}
            rows["experts"] += _expert_rows(snap.step, [(self.gates[g], m) for g, m in per_gate.items()])
            if loss_calls:
                rows["losses"] += [{"step": snap.step, "task": t, "loss": float(v) / loss_calls}
                                   for t, v in zip(self._loss_tasks or [], loss_sums, strict=True)]
                rows["events"] += self._loss_events(snap.step, rows["losses"][-len(loss_sums):])
        return {name: frame(name, r) for name, r in rows.items()}

    def _loss_events(self, step: int, losses: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """An event for each task whose loss turns non-finite for the first time (in the window ending at ``step``).

        The window's mean loss stays NaN/Inf in the ``losses`` table (it is the honest mean); the event
        names the exact first step, read from the device only now that a bad window was seen.
        """
        events = []
        for i, row in enumerate(losses):
            key = f"loss:{row['task']}"
            if math.isfinite(row["loss"]) or key in self._nonfinite_seen:
                continue
            self._nonfinite_seen.add(key)
            first = int(self._loss_first_bad[i]) if self._loss_first_bad is not None else NO_STEP
            at = first if first <= step else step  # under DDP the bad loss may be another rank's
            events.append({
                "step": at, "kind": "nonfinite_loss", "source": row["task"],
                "message": f"the loss of task {row['task']!r} was NaN/Inf first at step {at}; the mean loss of each "
                           "window holding it is NaN/Inf too (the gate statistics are not affected).",
            })
        return events

    def _gate_rows(
        self, step: int, gate: ResolvedGate, layout: Layout, sums: torch.Tensor, first_bad: int | None,
        rows: dict[str, list[dict[str, Any]]],
    ) -> dict[str, Any]:
        m = window_metrics(sums, layout)
        share = m["share"]
        prev = self._prev_share.get(gate.name)
        drift = float(js_divergence(prev, share)) if prev is not None and m["samples"] > 0 else math.nan
        if m["samples"] > 0:
            self._prev_share[gate.name] = share
        names = gate.expert_names() or [str(i) for i in range(layout.experts)]
        rows["gates"].append({
            "step": step, "gate": gate.name, "task": gate.task, "level": gate.level, "experts": layout.experts,
            "samples": m["samples"], "entropy": m["entropy"], "entropy_of_mean": m["entropy_of_mean"],
            "mutual_info": m["mutual_info"], "effective_experts": m["effective_experts"],
            "polarization": m["polarization"], "max_weight": m["max_weight"],
            "top_share": float(share.max()) if m["samples"] > 0 else math.nan, "spread": m["spread"],
            "drift": drift, "small_margin": m["small_margin"] if gate.top_k else math.nan,
            "nonfinite": m["nonfinite"], "first_nonfinite_step": first_bad,
        })
        selected = m["selected"] if gate.top_k else torch.full_like(share, math.nan)
        columns = zip(names, share.tolist(), m["std"].tolist(), m["top1"].tolist(), selected.tolist(), strict=True)
        rows["shares"] += [  # lists, not tensor indexing: one conversion per vector
            {"step": step, "gate": gate.name, "expert": i, "expert_name": name, "share": sh, "std": sd, "top1": t1,
             "selected": sel}
            for i, (name, sh, sd, t1, sel) in enumerate(columns)
        ]
        edges = torch.linspace(0, 1, layout.bins + 1).tolist()
        rows["hist"] += [
            {"step": step, "gate": gate.name, "bin": b, "lo": edges[b], "hi": edges[b + 1], "count": c}
            for b, c in enumerate(m["hist"].tolist())
        ]
        if first_bad is not None and gate.name not in self._nonfinite_seen:
            self._nonfinite_seen.add(gate.name)
            rows["events"].append({
                "step": first_bad, "kind": "nonfinite", "source": gate.name,
                "message": f"gate {gate.name!r} produced NaN/Inf weights first at step {first_bad}; those samples "
                           "are left out of its statistics.",
            })
        return {"share": share, "selected": selected, "names": names, "samples": m["samples"]}

    # ------------------------------------------------------------------ lifecycle
    def _initial_meta(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        inner = unwrap(self.model)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return {
            "format": RUN_FORMAT, "name": self.log_dir.name, "status": "running", "created": now,
            "updated": now, "ended": None, "error": None, "steps": 0, "tasks": self.tasks,
            "gates": [], "model_class": f"{type(inner).__module__}.{type(inner).__qualname__}",
            "versions": {"gatewatch": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "config": {"every": self.every, "flush_every": self.flush_every, "threshold": self.threshold,
                       "bins": self.bins, "margin": self.margin},
            "user_config": dict(config or {}), "host": socket.gethostname(), "pid": os.getpid(),
            "world_size": _world_size(),
        }

    def _write_meta(self, **fields: Any) -> None:
        self.meta.update(fields, steps=self.step_count, gates=[g.describe() for g in self.gates],
                         tasks=self.tasks or self._loss_tasks,
                         updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if getattr(self, "conflict", None) is not None:
            self.meta["conflict"] = self.conflict.describe()
        if self.writer is not None:
            self.writer.write_meta(self.meta)

    def close(self, *, error: BaseException | None = None) -> None:
        """Write what is left, mark the run finished (or crashed), and remove every hook."""
        if self.closed:
            return
        try:
            self._fold()
            if self.conflict is not None:
                self.conflict.end_step()
            # under DDP only the (shared) step count decides, so that every rank closes the same windows;
            # losses logged after the last step() are then left out, rather than some ranks waiting forever
            late_losses = bool(self._loss_calls) and _world_size() == 1
            if self.step_count > self._window_start or late_losses:
                self._close_window()
            self.flush()
        finally:
            self.closed = True
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            status = "finished" if error is None else "crashed"
            self.meta.update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             error=None if error is None else f"{type(error).__name__}: {error}")
            self._write_meta()
            if self.writer is not None:
                self.writer.close(self.meta)
            if self.tb is not None:
                self.tb.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "This GateWatch is closed (its hooks are removed). Create a new GateWatch to keep monitoring."
            )

    def __enter__(self) -> GateWatch:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(error=exc)

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            warnings.warn("GateWatch was not closed; call watch.close() to write the last window.",
                          ResourceWarning, stacklevel=1)


def _expert_rows(step: int, gates: list[tuple[ResolvedGate, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Utilization of each expert label: its share averaged over the gates that mix it."""
    acc: dict[str, dict[str, list[float]]] = {}
    for _gate, m in gates:
        if m["samples"] <= 0:
            continue
        e = len(m["names"])
        for i, name in enumerate(m["names"]):
            slot = acc.setdefault(name, {"share": [], "ref": [], "sel": []})
            slot["share"].append(float(m["share"][i]))
            slot["ref"].append(1.0 / e)
            slot["sel"].append(float(m["selected"][i]))
    return [
        {"step": step, "expert": name, "utilization": sum(v["share"]) / len(v["share"]),
         "reference": sum(v["ref"]) / len(v["ref"]), "selected": sum(v["sel"]) / len(v["sel"]),
         "gates": len(v["share"])}
        for name, v in acc.items()
    ]


def _conflict_monitor(model: nn.Module, tasks: Sequence[str] | None, every: Any, shared: SharedSpec,
                      threshold: float, group: GroupSpec, param_limit: int) -> ConflictMonitor | None:
    """The conflict monitor for GateWatch's conflict arguments (None when ``conflict_every`` is off)."""
    schedule = as_schedule("conflict_every", every)
    if schedule is None:
        return None
    if tasks is not None and len(tasks) < 2:
        raise ConflictError(f"conflict_every compares tasks, but tasks={list(tasks)} has one; set conflict_every=0.")
    return ConflictMonitor(model, schedule=schedule, shared=shared, threshold=threshold, group=group,
                           param_limit=param_limit, distributed=_world_size() > 1)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
