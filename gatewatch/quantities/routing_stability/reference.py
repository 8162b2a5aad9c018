"""Saturation against a reference checkpoint: the probe run through another model, compared with a run's sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from ...gating.discovery import resolve
from ...loaded_run import Run
from .capture import as_probe, choice_rows
from .read import history_of, set_keys


@torch.no_grad()
def saturation_against(run: Run, model: nn.Module, probe: Any, *,
                       gates: Mapping[str, Any] | Sequence[Any] | None = None, name: str = "reference",
                       tokens: int | None = None) -> pd.DataFrame:
    """The share of probe tokens whose top-k set at each probe of ``run`` (``gw.load_run(path)``) equals the one
    ``model`` (a reference checkpoint, loaded by you) chooses: OLMoE's saturation against that checkpoint.

    ``probe`` is the batch the run probed with (``saturation_probe``, or ``watch.routing_stability.probe_batch``
    saved during training); ``gates`` as for ``GateWatch`` (None: find the routers). Rows: step, gate,
    reference (``name``), tokens, saturation, top1_agree."""
    history = history_of(run)
    if not history.probes:
        raise ValueError(f"run {run.name!r} has no routing probe (routing_sets is empty): train with "
                         "GateWatch(..., saturation_every=N) to record one.")
    described = run.meta.get("routing_stability") or {}
    limit = int(tokens or described.get("tokens") or 1024)
    args, kwargs = as_probe(probe) or ((), {})
    found = {g.name: g for g in resolve(model, None, gates) if g.router is not None}
    missing = sorted(set(history.probes) - set(found))
    if missing:
        raise ValueError(f"the reference model has no router named {missing[:3]} (it has {sorted(found)[:3]} ...): "
                         "pass gates= as the run's GateWatch had them.")
    seen: dict[str, torch.Tensor] = {}

    def record(gate: Any) -> Any:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if gate.name not in seen:
                seen[gate.name] = choice_rows(gate.router, out, limit)
        return hook

    handles = [g.module.register_forward_hook(record(g)) for g in found.values()]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training
    reference = {}
    for gate, rows in seen.items():
        choice = rows.cpu().numpy()
        reference[gate] = (set_keys(choice[:, :-1]), choice[:, -1])
    return history.saturation(reference, name)


__all__ = ["saturation_against"]
