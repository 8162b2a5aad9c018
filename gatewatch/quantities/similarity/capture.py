"""Expert similarity, capture half: on scheduled steps, every expert's output on common rows of the batch.

The experts of each gate come from :mod:`gatewatch.gating.expert_map`, known once the gates have produced their
first output; so the pools (:mod:`.experts`) and their hooks are set up after the first step, which is never
measured. On a scheduled step (the first forward of the step only):

* expert modules: a forward hook keeps a detached view of the first ``similarity_rows`` rows of each expert's
  output (dense mixtures: every expert sees every row);
* fused experts: a pre-forward hook takes the first rows of the fused module's input and calls the module on them
  with the routing forced, each row to every expert (:mod:`.forced`); the pool's matrices are computed there and
  then, so only ``[2, E, E]`` is kept per layer. The probe rows are ``similarity_rows``, at most
  ``FUSED_BUDGET / E`` (256 at E=128), so that the experts' work and the CKA's grow with E, not E^2.

At ``watch.step()`` each pool gets its ``[2, E, E]`` matrices of linear CKA and mean-output cosine
(:func:`.maths.similarity_matrices`, device ops only). The flush moves them in the one ``"steps"`` state:
REPLICATED, as under DDP each rank measures its own batch and rank 0's figures are written.

Storage is bounded: a pool of more than ``similarity_top`` pairs writes every pair on the first measurement and
on every ``similarity_full_every``-th one, and only its ``similarity_top`` most similar pairs in between; every
measurement writes one ``similarity_summary`` row per pool (mean and largest CKA over all pairs, mean cosine).
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
from .forced import CannotForce, forced_outputs
from .maths import similarity_matrices

MAX_ROWS = 1024
FUSED_BUDGET = 32_768  # expert x row evaluations per fused layer and measurement
KEYWORDS: dict[str, Any] = {"similarity_every": 50, "similarity_rows": MAX_ROWS, "similarity_top": 32,
                            "similarity_full_every": 10}


def build(ctx: CaptureContext) -> ExpertSimilarity | None:
    """The similarity quantity (None when ``similarity_every`` is off)."""
    schedule = as_schedule("similarity_every", ctx.options["similarity_every"])
    rows = positive_int("similarity_rows", ctx.options["similarity_rows"], unit="rows of the batch")
    if rows > MAX_ROWS:
        raise ValueError(f"similarity_rows is at most {MAX_ROWS} (the cost grows with it), got {rows}: pass a "
                         f"smaller number, e.g. {MAX_ROWS}.")
    top = positive_int("similarity_top", ctx.options["similarity_top"], unit="expert pairs per pool")
    full = positive_int("similarity_full_every", ctx.options["similarity_full_every"], unit="measurements")
    return None if schedule is None else ExpertSimilarity(ctx, schedule, rows, top, full)


class ExpertSimilarity(Quantity):
    """Pairwise similarity of the experts of each pool on scheduled steps (see the module docstring)."""

    name = "similarity"

    def __init__(self, ctx: CaptureContext, schedule: Schedule, rows: int, top: int, full_every: int) -> None:
        self.ctx, self.schedule, self.limit, self.top, self.full_every = ctx, schedule, rows, top, full_every
        self.pools: list[Pool] = []
        self._experts: list[nn.Module] | None = None  # None: pools not looked for yet
        self._hooked = False  # the experts are hooked only for a measured step
        self._armed = False
        self._outputs: dict[int, torch.Tensor] = {}  # id(expert module) -> its first rows, this step
        self._fused: dict[int, torch.Tensor] = {}  # id(fused module) -> its pool's flat [2, E, E], this step
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, flat matrices of every pool) until the flush
        self._collected: list[int] = []
        self._measured = 0  # measurements written so far (every full_every-th one writes every pair)
        self._last = 0  # the last step measured (close() calls on_step again for the same step)
        self._skipped: dict[str, str] = {}
        self.add_state("steps", Reduction.REPLICATED)

    def _arm(self, armed: bool) -> None:
        """Hook the experts for the coming step when it is measured, and unhook them after it: a hooked module
        takes PyTorch's slower call path, so the other steps pay nothing."""
        if self._experts is None:  # the gates have mapped their experts by now
            self.pools = expert_pools(unwrap(self.ctx.model), self.ctx.gates)
            self._experts = list({id(m): m for pool in self.pools if pool.fused is None
                                  for m in pool.modules}.values())
        if armed and not self._hooked:
            for module in self._experts:
                self.hook(module, self._hook)
            for pool in self.pools:
                if pool.fused is not None:
                    self.hook(pool.modules[0], lambda call, pool=pool: self._hook_fused(pool, call), pre=True)
        elif not armed and self._hooked:
            self.detach()
        self._armed = self._hooked = armed

    def _hook(self, call: HookCall) -> None:
        out = call.output
        if self._armed and isinstance(out, torch.Tensor) and id(call.module) not in self._outputs:
            self._outputs[id(call.module)] = out.detach().reshape(-1, out.shape[-1])[: self.limit]

    def _hook_fused(self, pool: Pool, call: HookCall) -> None:
        if not self._armed or id(call.module) in self._fused or pool.name in self._skipped:
            return
        try:
            outputs = forced_outputs(call.module, call.args, pool.size, self.probe_rows(pool))
        except CannotForce as err:
            self._skipped[pool.name] = str(err)
            return
        self._fused[id(call.module)] = similarity_matrices(list(outputs.unbind(0))).reshape(-1)

    def probe_rows(self, pool: Pool) -> int:
        """The rows each expert of ``pool`` is measured on at most: ``similarity_rows``, bounded for fused pools."""
        return self.limit if pool.fused is None else min(self.limit, max(32, FUSED_BUDGET // pool.size))

    def on_step(self, step: int) -> None:
        outputs, fused = self._outputs, self._fused
        self._outputs, self._fused = {}, {}
        self._arm(bool(self.schedule(step + 1)))
        if not outputs and not fused:  # not a measured step
            return
        pieces = [fused.get(id(pool.modules[0])) if pool.fused is not None else self._measure(pool, outputs)
                  for pool in self.pools]
        if any(p is not None for p in pieces) and step != self._last:
            self._last = step
            flat = [p if p is not None else torch.full((2 * pool.size ** 2,), float("nan"))
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

    def _pairs(self, cka: np.ndarray, full: bool) -> tuple[np.ndarray, np.ndarray]:
        """The pairs (a < b) to write: all of them, or the ``top`` of largest CKA."""
        a, b = np.triu_indices(len(cka), k=1)
        if full or len(a) <= self.top:
            return a, b
        values = np.nan_to_num(cka[a, b], nan=-np.inf)
        keep = np.sort(np.argpartition(-values, self.top - 1)[: self.top])
        return a[keep], b[keep]

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> Rows:
        if "steps" not in host:
            return {}
        pairs: list[dict[str, Any]] = []
        summary: list[dict[str, Any]] = []
        for step, flat in zip(self._collected, host["steps"], strict=True):
            full = self._measured % self.full_every == 0
            self._measured += 1
            start = 0
            for pool in self.pools:
                e = pool.size
                cka, cosine = flat[start:start + 2 * e * e].reshape(2, e, e)
                start += 2 * e * e
                if np.isnan(cka).all():  # not measured at this step
                    continue
                a, b = self._pairs(cka, full)
                labels = pool.labels
                pairs += [{"step": step, "pool": pool.name, "expert_a": labels[i], "expert_b": labels[j],
                           "cka": float(cka[i, j]), "mean_cosine": float(cosine[i, j])}
                          for i, j in zip(a.tolist(), b.tolist(), strict=True)]
                upper = np.triu_indices(e, k=1)
                summary.append({"step": step, "pool": pool.name, "pairs": len(upper[0]), "written": len(a),
                                "mean_cka": float(np.nanmean(cka[upper])), "max_cka": float(np.nanmax(cka[upper])),
                                "mean_cosine": float(np.nanmean(cosine[upper]))
                                if not np.isnan(cosine[upper]).all() else float("nan")})
        return {"similarity": pairs, "similarity_summary": summary}

    def describe(self) -> dict[str, Any]:
        return {"similarity": {
            "schedule": describe(self.schedule), "rows": self.limit, "top": self.top,
            "full_every": self.full_every, "skipped": dict(self._skipped),
            "pools": {p.name: {"gates": p.gates, "experts": p.labels, "modules": p.paths,
                               "fused": p.fused is not None, "rows": self.probe_rows(p)} for p in self.pools},
        }}
