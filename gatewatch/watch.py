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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .accumulators import GateAccumulator, Snapshot, decode, to_host
from .functional import Layout, js_divergence, window_metrics
from .gates import GateOutputError, ResolvedGate, resolve, unwrap
from .schema import RUN_FORMAT, frame
from .sinks.run_dir import RunDirWriter
from .sinks.tensorboard import TensorBoardSink

Losses = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (steps), got {value!r}.")
    return value


class GateWatch:
    """Capture every gate of ``model`` during training and log its health to ``log_dir``.

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GateWatch needs an nn.Module, got {type(model).__name__}.")
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
        self.step_count = 0
        self.closed = False
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._windows: list[tuple[Snapshot, int]] = []
        self._loss_sum: torch.Tensor | None = None
        self._loss_calls = 0
        self._loss_tasks: list[str] | None = list(tasks) if tasks else None
        self._prev_share: dict[str, torch.Tensor] = {}
        self._nonfinite_seen: set[str] = set()
        self._window_start = 0
        self.acc = GateAccumulator([g.top_k for g in self.gates], threshold=threshold, bins=bins, margin=margin)
        self.rank = _rank()
        self.writer = RunDirWriter(self.log_dir) if self.rank == 0 else None
        self.tb = TensorBoardSink(self.log_dir / "tensorboard") if tensorboard and self.rank == 0 else None
        self._handles = [g.module.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]
        self.meta = self._initial_meta(config)
        self._write_meta()

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
            if len(self._pending) > 64 * len(self.gates):  # forward passes without step(): stay bounded
                self._fold()

        return hook

    def _first_output(self, gate: ResolvedGate, p: torch.Tensor) -> None:
        """Check a gate's first output once (one host sync) and record its expert count."""
        e = p.shape[-1]
        if gate.experts is not None and len(gate.experts) != e:
            raise GateOutputError(
                f"Gate {gate.name!r} has {e} outputs but {len(gate.experts)} expert names were given."
            )
        if gate.output == "probs":
            rows = p.sum(-1)
            rows = rows[torch.isfinite(rows)]
            if rows.numel() and ((rows - 1).abs().max() > 1e-3 or (p[torch.isfinite(p)] < 0).any()):
                raise GateOutputError(
                    f"Gate {gate.name!r} ({gate.path}) output rows sum to {float(rows.min()):.4g}.."
                    f"{float(rows.max()):.4g}, not 1: it does not look like probabilities. If the module emits "
                    f'logits (softmax applied later), pass gw.Gate("{gate.path}", output="logits").'
                )
        if gate.experts is None and gate.task is None and sum(g.task is None for g in self.gates) > 1:
            gate.experts = [f"{gate.name}:{i}" for i in range(e)]  # task-less gates (layers) own their experts
        gate.n_experts = e
        self._write_meta()

    def _fold(self) -> None:
        """Fold the captured outputs into the window sums, stacking outputs of the same shape."""
        pending, self._pending = self._pending, []
        groups: dict[tuple[Any, ...], list[tuple[int, torch.Tensor]]] = {}
        for index, p in pending:
            groups.setdefault((tuple(p.shape), p.device, p.dtype), []).append((index, p))
        for items in groups.values():
            ids = [i for i, _ in items]
            stacked = items[0][1].unsqueeze(0) if len(items) == 1 else torch.stack([p for _, p in items])
            self.acc.add(ids, stacked, self.step_count + 1)

    # ------------------------------------------------------------------ losses
    def _loss_items(self, losses: Losses) -> list[tuple[str, torch.Tensor]]:
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
        ``scaler.scale(watch.log_losses(losses)).backward()``.
        """
        self._check_open()
        items = self._loss_items(losses)
        values = torch.stack([loss.detach().float().reshape(()) for _, loss in items])
        self._loss_sum = values if self._loss_sum is None else self._loss_sum + values.to(self._loss_sum)
        self._loss_calls += 1
        total = items[0][1]
        for _, loss in items[1:]:
            total = total + loss
        return total

    def backward(self, losses: Losses, **backward_kwargs: Any) -> torch.Tensor:
        """Backpropagate the sum of the task losses, exactly as ``sum(losses).backward()`` would."""
        total = self.log_losses(losses)
        total.backward(**backward_kwargs)
        return total.detach()

    # ------------------------------------------------------------------ schedule
    def step(self) -> None:
        """Call once per optimizer step, after it."""
        self._check_open()
        self._fold()
        self.step_count += 1
        if self.step_count % self.every == 0:
            self._close_window()
        if self.step_count % self.flush_every == 0:
            self.flush()

    def _close_window(self) -> None:
        extra = self._loss_sum
        snap = self.acc.snapshot(self.step_count, extra=extra)
        if snap is not None:
            self._windows.append((snap, self._loss_calls if extra is not None else 0))
        self._loss_sum, self._loss_calls = None, 0
        self._window_start = self.step_count

    def flush(self) -> None:
        """Move the closed windows to the host (one transfer) and write them out."""
        windows, self._windows = self._windows, []
        hosts = to_host([snap for snap, _ in windows])
        tables = self._tables(windows, hosts)
        if self.writer is not None:
            self.writer.write(tables)
            self._write_meta()
        if self.tb is not None:
            self.tb.write(tables)

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
        return {name: frame(name, r) for name, r in rows.items()}

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
        rows["shares"] += [
            {"step": step, "gate": gate.name, "expert": i, "expert_name": names[i], "share": float(share[i]),
             "std": float(m["std"][i]), "top1": float(m["top1"][i]), "selected": float(selected[i])}
            for i in range(layout.experts)
        ]
        edges = torch.linspace(0, 1, layout.bins + 1)
        rows["hist"] += [
            {"step": step, "gate": gate.name, "bin": b, "lo": float(edges[b]), "hi": float(edges[b + 1]),
             "count": float(c)}
            for b, c in enumerate(m["hist"])
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
        if self.writer is not None:
            self.writer.write_meta(self.meta)

    def close(self, *, error: BaseException | None = None) -> None:
        """Write what is left, mark the run finished (or crashed), and remove every hook."""
        if self.closed:
            return
        try:
            self._fold()
            if self.step_count > self._window_start or self._loss_calls:
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


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
