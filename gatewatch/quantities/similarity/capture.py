"""Expert similarity, capture half: on scheduled steps, each expert's output on the first rows of the batch.

The expert modules of each gate come from :mod:`gatewatch.gating.expert_map`, known once the gates have produced their
first output; so the pools (:mod:`.experts`) and their forward hooks are set up after the first step, which is
never measured. On a scheduled step the hooks keep a detached view of the first ``similarity_rows`` rows of each
expert's output (the first forward of the step only). At
``watch.step()`` each pool of experts gets its ``[2, E, E]`` matrices of linear CKA and mean-output cosine
(:func:`.maths.similarity_matrices`, device ops only). The flush moves them in the one ``"steps"`` state:
REPLICATED, as under DDP each rank measures its own batch and rank 0's figures are written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ...capture.gate_hooks import HookCall
from ...capture.quantity import CaptureContext, Quantity, Reduction, Rows
from ...schedules import Schedule, as_schedule, describe
from ...validate import positive_int
from ...wrappers import unwrap
from .experts import Pool, expert_pools
from .maths import similarity_matrices

MAX_ROWS = 1024
KEYWORDS: dict[str, Any] = {"similarity_every": 50, "similarity_rows": MAX_ROWS}


def build(ctx: CaptureContext) -> ExpertSimilarity | None:
    """The similarity quantity (None when ``similarity_every`` is off)."""
    schedule = as_schedule("similarity_every", ctx.options["similarity_every"])
    rows = positive_int("similarity_rows", ctx.options["similarity_rows"], unit="rows of the batch")
    if rows > MAX_ROWS:
        raise ValueError(f"similarity_rows is at most {MAX_ROWS} (the cost grows with it), got {rows}: pass a "
                         f"smaller number, e.g. {MAX_ROWS}.")
    return None if schedule is None else ExpertSimilarity(ctx, schedule, rows)


class ExpertSimilarity(Quantity):
    """Pairwise similarity of the experts of each pool on scheduled steps (see the module docstring)."""

    name = "similarity"

    def __init__(self, ctx: CaptureContext, schedule: Schedule, rows: int) -> None:
        self.ctx, self.schedule, self.limit = ctx, schedule, rows
        self.pools: list[Pool] = []
        self._experts: list[nn.Module] | None = None  # None: pools not looked for yet
        self._hooked = False  # the experts are hooked only for a measured step
        self._armed = False
        self._outputs: dict[int, torch.Tensor] = {}  # id(expert module) -> its first rows, this step
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, flat matrices of every pool) until the flush
        self._collected: list[int] = []
        self._last = 0  # the last step measured (close() calls on_step again for the same step)
        self._skipped: dict[str, str] = {}
        self.add_state("steps", Reduction.REPLICATED)

    def _arm(self, armed: bool) -> None:
        """Hook the experts for the coming step when it is measured, and unhook them after it: a hooked module
        takes PyTorch's slower call path, so the other steps pay nothing."""
        if self._experts is None:  # the gates have mapped their experts by now
            self.pools = expert_pools(unwrap(self.ctx.model), self.ctx.gates)
            self._experts = list({id(m): m for pool in self.pools for m in pool.modules}.values())
        if armed and not self._hooked:
            for module in self._experts:
                self.hook(module, self._hook)
        elif not armed and self._hooked:
            self.detach()
        self._armed = self._hooked = armed

    def _hook(self, call: HookCall) -> None:
        out = call.output
        if self._armed and isinstance(out, torch.Tensor) and id(call.module) not in self._outputs:
            self._outputs[id(call.module)] = out.detach().reshape(-1, out.shape[-1])[: self.limit]

    def on_step(self, step: int) -> None:
        outputs, self._outputs = self._outputs, {}
        self._arm(bool(self.schedule(step + 1)))
        if not outputs:  # not a measured step
            return
        pieces = [self._measure(pool, outputs) for pool in self.pools]
        if any(p is not None for p in pieces) and step != self._last:
            self._last = step
            flat = [p if p is not None else torch.full((2 * len(pool.modules) ** 2,), float("nan"))
                    for p, pool in zip(pieces, self.pools, strict=True)]
            like = next(p for p in pieces if p is not None)
            self._pending.append((step, torch.cat([f.to(like) for f in flat])))

    def _measure(self, pool: Pool, outputs: dict[int, torch.Tensor]) -> torch.Tensor | None:
        xs = [outputs.get(id(m)) for m in pool.modules]
        if any(x is None for x in xs):
            return None
        if len({x.shape[0] for x in xs if x is not None}) != 1:  # routed experts see different rows
            self._skipped[pool.name] = "its experts' outputs have different numbers of rows (routed tokens)"
            return None
        return similarity_matrices([x for x in xs if x is not None]).reshape(-1)

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        pending, self._pending = self._pending, []
        self._collected = [step for step, _ in pending]
        if not pending:
            return {}
        return {"steps": torch.stack([flat for _, flat in pending])}

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        if "steps" not in host:
            return {}
        out: list[dict[str, Any]] = []
        for step, flat in zip(self._collected, host["steps"], strict=True):
            start = 0
            for pool in self.pools:
                e = len(pool.modules)
                cka, cosine = flat[start:start + 2 * e * e].reshape(2, e, e)
                start += 2 * e * e
                if np.isnan(cka).all():  # not measured at this step
                    continue
                out += [{"step": step, "pool": pool.name, "expert_a": pool.labels[a], "expert_b": pool.labels[b],
                         "cka": float(cka[a, b]), "mean_cosine": float(cosine[a, b])}
                        for a in range(e) for b in range(a + 1, e)]
        return {"similarity": out}

    def describe(self) -> dict[str, Any]:
        return {"similarity": {
            "schedule": describe(self.schedule), "rows": self.limit, "skipped": dict(self._skipped),
            "pools": {p.name: {"gates": p.gates, "experts": p.labels, "modules": p.paths} for p in self.pools},
        }}
