"""Conflict proxy, capture half: per step, each task's gradient at its own tower input (a tensor hook in the
ordinary backward), combined with its gate's weights into a gradient per expert output.

For task k with gate weights ``g_k [N, E]`` over expert modules and gradient ``d_k [N, D]`` at its tower input
(the mixture ``sum_i g_{k,i} f_i``), the gradient reaching expert i's output on sample n is ``g_{k,i}(n) d_k(n)``.
The proxy compares the tasks on these vectors: per expert module m, the dot product of tasks a and b is
``sum_n q_a[n,m] q_b[n,m] <d_a(n), d_b(n)>`` with ``q_k = g_k`` summed over the columns that weigh m. It skips the
expert's Jacobian, so it is a proxy for the exact cosine on the expert's parameters, and it costs no extra
backward. In PLE it covers the last level (the towers' inputs mix the last level's experts).

At ``watch.step()`` each sample's gradients are reduced at once to the tasks' inner products
``<d_a(n), d_b(n)>`` (summed in float64, ``[N, K(K+1)/2]``), so the ``[N, D]`` gradients are released within the step;
the weighting by the gates' columns is done at the flush (or once ``HOLD_ELEMENTS`` are held), stacked over
the steps.

Under torch.distributed it states its scope as conflict does (``conflict_scope``): ``"applied"`` gathers every
rank's rows (one gather per flush) and sums them by step, divided by the squared number of ranks: the proxy of the
gradient of the mean over ranks of each rank's mean loss, on every rank's samples; ``"local"``: rank 0's rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...capture.distributed import world_size
from ...capture.gate_hooks import HookCall
from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows
from ...gating.expert_map import ExpertMapError, find_towers
from ...gating.specs import ResolvedGate
from ...schema import conform
from ...wrappers import unwrap
from .read import proxy_rows

KEYWORDS: dict[str, Any] = {"conflict_proxy": False, "towers": None}
HOLD_ELEMENTS = 4_000_000  # gate weights and inner products held until the flush; above: fold early


def build(ctx: CaptureContext) -> ConflictProxy | None:
    if not ctx.options["conflict_proxy"]:
        return None
    if not ctx.tasks or len(ctx.tasks) < 2:
        raise ExpertMapError("conflict_proxy compares tasks: pass tasks=[...] with at least two task names.")
    if "pp" in (getattr(ctx.mesh, "mesh_dim_names", None) or ()):
        raise ExpertMapError("conflict_proxy is not measured across pipeline stages (a mesh with 'pp'): it multiplies "
                             "a gate's weights by the gradient at each task's tower input, and the gate and the "
                             "towers are on different stages. Pass conflict_proxy=False (the gate, router and loss "
                             "statistics of every stage stay exact).")
    return ConflictProxy(ctx)


def task_gates(gates: list[ResolvedGate], tasks: list[str]) -> dict[str, ResolvedGate]:
    """The gate mixing each task's tower input: the task's gate of the highest level, or the one task-less gate."""
    shared = [g for g in gates if g.task is None]
    out = {}
    for task in tasks:
        own = [g for g in gates if g.task == task]
        if own:
            out[task] = max(own, key=lambda g: g.level)
        elif len(shared) == 1:
            out[task] = shared[0]
        else:
            raise ExpertMapError(f"conflict_proxy: task {task!r} has no gate of its own and there is not exactly "
                                 "one gate without a task; name each gate's task with gw.Gate(..., task=...).")
    return out


class ConflictProxy(Quantity):
    """Per step, the tasks' gram of gradients at each expert module's output (state ``"proxy"``: CONCAT, one row
    per step and rank, summed by step on the host)."""

    name = "proxy"

    def __init__(self, ctx: CaptureContext) -> None:
        self.ctx = ctx
        self.tasks = list(ctx.tasks or [])
        model = unwrap(ctx.model)
        self.tower_paths = find_towers(model, self.tasks, ctx.options["towers"])
        self.gates = task_gates(ctx.gates, self.tasks)
        modules = dict(model.named_modules())
        self._latest: dict[str, torch.Tensor] = {}  # gate name -> its last output (probs)
        self._step: dict[str, list[list[Any]]] = {t: [] for t in self.tasks}  # task -> [[probs, grad]] this step
        self._held: list[tuple[int, list[torch.Tensor], torch.Tensor]] = []  # (step, weights per task, inner)
        self._held_elements = 0
        self._below: dict[tuple[str, str], np.ndarray] = {}
        self.modules: list[str] | None = None
        self._maps: torch.Tensor | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []
        self.scope = ctx.options.get("conflict_scope", "applied")
        self.ranks = world_size() if ctx.distributed and self.scope == "applied" else 1
        self.add_state("proxy", Reduction.CONCAT if self.ranks > 1 else Reduction.REPLICATED)
        for gate in {g.name: g for g in self.gates.values()}.values():
            self.hook_gate(gate, self._gate_hook(gate))
        for task, path in self.tower_paths.items():
            self.hook(modules[path], self._tower_hook(task), pre=True)

    def _gate_hook(self, gate: ResolvedGate) -> Any:
        def hook(call: HookCall) -> None:
            self._latest[gate.name] = call.probs(gate)
        return hook

    def _tower_hook(self, task: str) -> Any:
        gate = self.gates[task]

        def hook(call: HookCall) -> None:
            h = call.args[0] if call.args else None
            probs = self._latest.get(gate.name)
            if probs is None or not isinstance(h, torch.Tensor) or not h.requires_grad:
                return
            item: list[Any] = [probs, None]
            self._step[task].append(item)
            h.register_hook(lambda grad: item.__setitem__(1, grad.detach().reshape(-1, grad.shape[-1])))
        return hook

    def on_step(self, step: int) -> None:
        """Reduce the step's gradients to per-sample inner products; hold them with the gate weights."""
        done = {t: [i for i in items if i[1] is not None] for t, items in self._step.items()}
        self._step = {t: [] for t in self.tasks}
        if all(done.values()):
            q = [_joined([p for p, _ in done[t]]) for t in self.tasks]
            inner = sample_inner([_joined([g for _, g in done[t]]) for t in self.tasks])
            self._held.append((step, q, inner))
            self._held_elements += inner.numel() + sum(x.numel() for x in q)
        if self._held_elements > HOLD_ELEMENTS:
            self._fold()

    def _module_maps(self) -> torch.Tensor:
        """``[K, E, M]``: which expert module each column of each task's gate weighs (0/1)."""
        maps = {t: g.expert_modules for t, g in self.gates.items()}
        if any(m is None for m in maps.values()):
            missing = {t: g.expert_map for t, g in self.gates.items() if g.expert_modules is None}
            raise ExpertMapError(f"conflict_proxy needs the expert module of every gate column; not found for "
                                 f"{missing}. Pass gw.Gate(..., expert_modules=[...]).")
        self.modules = list(dict.fromkeys(m for paths in maps.values() for m in paths or []))
        width = max(len(p or []) for p in maps.values())
        out = torch.zeros(len(self.tasks), width, len(self.modules), dtype=torch.float64)
        for k, t in enumerate(self.tasks):
            for i, m in enumerate(maps[t] or []):
                out[k, i, self.modules.index(m)] = 1.0
        return out

    def _fold(self) -> None:
        """The gram ``[K, K, M]`` of every held step, computed in stacks of steps of equal shapes."""
        held, self._held, self._held_elements = self._held, [], 0
        if not held:
            return
        if self._maps is None:
            self._maps = self._module_maps()
        groups: dict[tuple[Any, ...], list[tuple[int, list[torch.Tensor], torch.Tensor]]] = {}
        for item in held:
            groups.setdefault(tuple(tuple(x.shape) for x in [*item[1], item[2]]), []).append(item)
        k = len(self.tasks)
        for items in groups.values():
            # per task: weights per expert module [S, N, M]; inner products [S, N, pairs], stacked over the steps
            stacked = [torch.stack([qs[t] for _, qs, _ in items]).double() for t in range(k)]
            q = [_by_module(x, self._maps[t, : x.shape[-1]]) for t, x in enumerate(stacked)]
            inner = torch.stack([x for _, _, x in items])
            gram = torch.empty(len(items), k, k, q[0].shape[-1], dtype=torch.float64, device=inner.device)
            for p, (a, b) in enumerate(_pairs(k)):
                gram[:, a, b] = gram[:, b, a] = torch.mul(q[a], inner[..., p : p + 1]).mul_(q[b]).sum(1)
            steps = torch.tensor([float(s) for s, _, _ in items], dtype=torch.float64, device=gram.device)
            self._pending.append((len(items), torch.cat([steps[:, None], gram.reshape(len(items), -1)], 1)))

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        self._fold()
        pending, self._pending = self._pending, []
        if not pending:
            return {}
        return {"proxy": torch.cat([rows for _, rows in pending])}

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        if "proxy" not in host or self.modules is None:
            return {}
        k, m = len(self.tasks), len(self.modules)
        table = host["proxy"]
        steps = np.unique(table[:, 0])
        summed = np.stack([table[table[:, 0] == s, 1:].sum(0) for s in steps]).reshape(len(steps), k, k, m)
        summed /= self.ranks**2  # each rank's d_k is that of its own mean loss; the applied loss is their mean
        rows = proxy_rows(steps.astype(np.int64), summed, self.tasks, self.modules,
                          float(self.ctx.options.get("conflict_threshold") or 0.0), self._below)
        return {"conflict_proxy": conform("conflict_proxy", rows)}

    def describe(self) -> dict[str, Any]:
        return {"conflict_proxy": {"towers": self.tower_paths, "gates": {t: g.name for t, g in self.gates.items()},
                                   "modules": self.modules, "method": "gate weight x gradient at the tower input",
                                   "scope": self.scope}}


def sample_inner(d: list[torch.Tensor]) -> torch.Tensor:
    """``[N, K(K+1)/2]``: per sample n, ``<d_a(n), d_b(n)>`` for the task pairs a <= b of the ``[N, D]`` gradients
    ``d``. Products in float32 (float64 gradients: float64; half precision is widened first), sums in float64."""
    d = [x.to(torch.promote_types(x.dtype, torch.float32)) for x in d]
    return torch.stack([(d[a] * d[b]).sum(-1, dtype=torch.float64) for a, b in _pairs(len(d))], 1)


def _by_module(q: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Gate weights ``q [S, N, E]`` summed over the columns that weigh each expert module (``columns [E, M]``, 0/1,
    on the host): ``q`` itself where column i weighs module i alone."""
    if columns.shape[0] == columns.shape[1] and torch.equal(columns, torch.eye(len(columns), dtype=columns.dtype)):
        return q
    return q @ columns.to(q.device)


def _pairs(k: int) -> list[tuple[int, int]]:
    """Task index pairs ``(a, b)``, a <= b: the entries of a symmetric K x K gram."""
    return [(a, b) for a in range(k) for b in range(a, k)]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batches of a step as one tensor (no copy for a single one)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
