"""Conflict meets routing: the expert map (explicit, inferred for MMoE/OMoE/CGC/PLE in both expert orders) and
``expert_conflict`` of the report, checked against a brute force (separate per-task backward, numpy cosine,
gate means taken from the gate outputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_conflict import data_losses, run_with_reference
from torch import nn

import gatewatch as gw
from gatewatch.gating.expert_map import ExpertMapError, infer_expert_modules
from gatewatch.models import PLE, MMoE, OMoE
from gatewatch.quantities.conflict.read import contested_floor
from gatewatch.report import build_report
from gatewatch.rules import Thresholds


# ---------------------------------------------------------------------------------------------- the map
@pytest.mark.parametrize("order", ["specific_first", "shared_first"])
def test_ple_map_follows_the_expert_order(order: str) -> None:
    model = PLE(in_dim=5, tasks=["a", "b"], n_levels=2, n_specific=2, n_shared=1, expert_order=order)
    task, _ = infer_expert_modules(model, "levels.1.gates.b.1", 3, "b", ["a", "b"])
    shared, _ = infer_expert_modules(model, "levels.0.shared_gate.1", 5, None, ["a", "b"])
    mine = ["levels.1.specific.b.0", "levels.1.specific.b.1"]
    everyone = [f"levels.0.specific.{t}.{i}" for t in "ab" for i in range(2)]
    if order == "specific_first":
        assert task == [*mine, "levels.1.shared.0"]
        assert shared == [*everyone, "levels.0.shared.0"]
    else:
        assert task == ["levels.1.shared.0", *mine]
        assert shared == ["levels.0.shared.0", *everyone]


class FlatCGC(nn.Module):
    """A CGC laid out as some libraries do: one flat list of T x n specific experts in task order, shared
    experts apart, gates as Linear layers in a ModuleList (softmax applied functionally)."""

    def __init__(self, tasks: list[str], n_specific: int = 2, n_shared: int = 2, dim: int = 6) -> None:
        super().__init__()
        self.tasks = tasks
        self.experts_specific = nn.ModuleList(nn.Linear(dim, 4) for _ in range(len(tasks) * n_specific))
        self.experts_shared = nn.ModuleList(nn.Linear(dim, 4) for _ in range(n_shared))
        self.gates = nn.ModuleList(nn.Linear(dim, n_specific + n_shared) for _ in tasks)
        self.towers = nn.ModuleList(nn.Linear(4, 1) for _ in tasks)


def test_flat_cgc_map_uses_labels_or_assumes_specific_first() -> None:
    model = FlatCGC(["x", "y"])
    paths, how = infer_expert_modules(model, "gates.1", 4, "y", ["x", "y"])
    assert paths == ["experts_specific.2", "experts_specific.3", "experts_shared.0", "experts_shared.1"]
    assert "assumed" in how
    paths, how = infer_expert_modules(model, "gates.1", 4, "y", ["x", "y"], labels=["shared0", "shared1", "y0", "y1"])
    assert paths == ["experts_shared.0", "experts_shared.1", "experts_specific.2", "experts_specific.3"]
    assert "assumed" not in how


def test_map_says_why_when_nothing_fits() -> None:
    model = MMoE(in_dim=5, tasks=["a", "b"], n_experts=3)
    paths, how = infer_expert_modules(model, "gates.a.1", 5, "a", ["a", "b"])
    assert paths is None and "expert_modules" in how
    assert infer_expert_modules(OMoE(in_dim=5, tasks=["a", "b"], n_experts=3), "gate.1", 3)[0] == [
        "experts.0", "experts.1", "experts.2"]


def test_explicit_map_is_checked_and_stored(tmp_path: Path) -> None:
    model = MMoE(in_dim=6, tasks=["a", "b"], n_experts=3)
    with pytest.raises(ExpertMapError, match=r"no module at 'experts\.9'"):
        gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / "bad", tensorboard=False,
                     gates={"a": gw.Gate("gates.a.1", expert_modules=["experts.0", "experts.9", "experts.2"])})
    reversed_map = ["experts.2", "experts.1", "experts.0"]
    gates = {"a": gw.Gate("gates.a.1", expert_modules=reversed_map), "b": gw.Gate("gates.b.1")}
    with gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / "run", tensorboard=False, gates=gates) as watch:
        losses = data_losses(8)(model, 1)
        watch.backward(losses)
        watch.step()
    described = {g["name"]: g for g in gw.load_run(tmp_path / "run").meta["gates"]}
    assert described["a"]["expert_modules"] == reversed_map and described["a"]["expert_map"] == "explicit"
    assert described["b"]["expert_modules"] == ["experts.0", "experts.1", "experts.2"]
    assert described["b"]["expert_map"] == "inferred: children of experts"


# ---------------------------------------------------------------------------------------------- brute force
def train_with_reference(model: nn.Module, tmp_path: Path, steps: int = 4, every: int = 2
                         ) -> tuple[gw.Run, dict, dict[int, dict[str, np.ndarray]]]:
    """Train with conflict on every step; on a twin, each step's per-task gradients (test_conflict's lockstep
    reference) and, from every forward, each gate's mean output per step."""
    means: dict[int, dict[str, np.ndarray]] = {}
    plain = data_losses()

    def recording(m: nn.Module, step: int) -> dict[str, torch.Tensor]:
        softmaxes = [(p, mod) for p, mod in m.named_modules() if isinstance(mod, nn.Softmax)]
        seen = means.setdefault(step, {})
        handles = [mod.register_forward_hook(lambda _m, _i, out, p=p: seen.__setitem__(
            p, out.detach().double().mean(0).numpy())) for p, mod in softmaxes]
        try:
            return plain(m, step)
        finally:
            for h in handles:
                h.remove()

    run, measured, _ = run_with_reference(model, tmp_path, steps=steps, losses=recording, every=every)
    paths = {g["name"]: g["path"] for g in run.meta["gates"]}
    return run, measured[-1][1], {s: {n: seen[p] for n, p in paths.items()} for s, seen in means.items()}


def brute_force(run: gw.Run, grads: dict, means: dict[int, dict[str, np.ndarray]], steps: int, every: int
                ) -> dict[tuple[str, str, str], tuple[float, dict[str, float]]]:
    """(module, a, b) -> (cosine at the last step by numpy, each task's mean share in the last window)."""
    window = range(steps - every + 1, steps + 1)
    gates = run.meta["gates"]
    tasks = run.tasks
    out = {}
    modules = {m for g in gates for m in g["expert_modules"]}
    for module in modules:
        share = {}
        for task in tasks:
            cols = [(g["name"], g["expert_modules"].index(module)) for g in gates
                    if g["task"] == task and module in g["expert_modules"]]
            share[task] = float(np.mean([np.mean([means[s][n][c] for s in window]) for n, c in cols])) if cols else 0.0
        vec = {t: np.concatenate([g for n, g in grads[t].items() if n.startswith(module + ".")]) for t in tasks}
        for i, a in enumerate(tasks):
            for b in tasks[i + 1:]:
                na, nb = np.linalg.norm(vec[a]), np.linalg.norm(vec[b])
                if na > 0 and nb > 0:
                    out[(module, a, b)] = (float(vec[a] @ vec[b] / (na * nb)), {a: share[a], b: share[b]})
    return out


@pytest.mark.parametrize("make", [
    lambda: MMoE(in_dim=12, tasks=["ctr", "like", "buy"], n_experts=3, expert_hidden=(8,), expert_dim=6),
    lambda: PLE(in_dim=12, tasks=["ctr", "like"], n_levels=2, n_specific=2, n_shared=2, expert_hidden=(8,),
                expert_dim=6, expert_order="shared_first"),
], ids=["mmoe", "ple-shared-first"])
@pytest.mark.slow
def test_expert_conflict_matches_brute_force(make, tmp_path: Path) -> None:
    torch.manual_seed(0)
    steps, every = 4, 2
    run, grads, means = train_with_reference(make(), tmp_path, steps, every)
    expected = brute_force(run, grads, means, steps, every)
    got = {(e["module"], *e["tasks"]): e for e in build_report(run)["expert_conflict"]}
    assert expected and set(expected) <= set(got)
    for key, (cosine, share) in expected.items():
        entry = got[key]
        assert entry["mode"] == "exact" and entry["step"] == steps and entry["window_step"] == steps
        assert entry["measured"] == steps
        assert entry["cosine"] == pytest.approx(cosine, abs=2e-5)
        assert entry["share"] == pytest.approx(share, abs=1e-6)
    if "levels.0.shared_gate.1" in {g["path"] for g in run.meta["gates"]}:
        own = got[("levels.1.specific.ctr.0", "ctr", "like")] if ("levels.1.specific.ctr.0", "ctr", "like") in got \
            else got[("levels.0.specific.ctr.0", "ctr", "like")]
        assert own["share"]["like"] == 0.0  # a task whose gates do not mix the expert


@pytest.mark.slow
def test_contested_expert_fires_on_shared_fighting_expert(tmp_path: Path) -> None:
    """Two tasks with opposite targets routed through the same experts: their gradients fight there."""
    torch.manual_seed(0)
    model = MMoE(in_dim=12, tasks=["ctr", "like"], n_experts=2, expert_hidden=(8,), expert_dim=6)
    run, _, _ = train_with_reference(model, tmp_path, steps=6, every=2)
    report = build_report(run)
    rows = {e["expert"]: e for e in report["expert_conflict"]}
    for finding in [f for f in report["findings"] if f["code"] == "contested_expert"]:
        assert min(rows[finding["expert"]]["share"].values()) >= contested_floor(Thresholds(), 2)
    assert contested_floor(Thresholds(), 2) == Thresholds().contested_even / 2  # relative to an even share 1/E
    loose = build_report(run, Thresholds(contested_share=0.0, contested_even=0.0, contested_below=0.0))
    flagged = [f for f in loose["findings"] if f["code"] == "contested_expert"]
    assert len(flagged) == len(rows)  # everything fires when the thresholds let it
    assert "task-specific" in flagged[0]["remedy"] and flagged[0]["expert"] in flagged[0]["remedy"]
    assert {e["share_source"] for e in report["expert_conflict"]} == {"task gate"}
    strict = build_report(run, Thresholds(contested_share=1.01))
    assert not [f for f in strict["findings"] if f["code"] == "contested_expert"]


# ---------------------------------------------------------------------------------------------- report and figure
SAMPLE = Path(__file__).parents[1] / "sample_runs" / "mmoe-polarized"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="sample run missing")
@pytest.mark.slow
def test_sample_run_report_shape_and_figure() -> None:
    """A run recorded before run.json kept the map falls back on the module names; the figure draws every
    expert at every conflict step, with the contested corner marked."""
    from gatewatch import figures
    from gatewatch.quantities.conflict.read import expert_table

    run = gw.load_run(SAMPLE)
    entries = build_report(run)["expert_conflict"]
    assert [e["module"] for e in entries] == [f"experts.{i}" for i in range(4)]
    assert set(entries[0]) == {"expert", "module", "tasks", "mode", "cosine", "below", "measured", "share", "step",
                               "window_step", "experts", "share_source", "scope"}
    assert {e["scope"] for e in entries} == {run.meta["conflict"].get("scope", "local")}  # old runs read as local
    top = max(entries, key=lambda e: e["share"]["income"])
    assert top["module"] == "experts.0" and top["share"]["income"] > 0.9
    table = expert_table(run)
    fig = figures.expert_conflict_map(table, contested_share=0.2)
    steps = sorted(table["step"].unique())
    assert len(fig.frames) == min(len(steps), 60) and fig.frames[-1].name == str(steps[-1])
    assert len(fig.data[0].x) == 4 and list(fig.data[0].text) == ["0", "1", "2", "3"]
    last = table[table["step"] == steps[-1]].sort_values("module")
    assert np.allclose(fig.data[0].y, last["cosine"])
    assert np.allclose(fig.data[0].x, last[["share_a", "share_b"]].min(axis=1))
    assert fig.layout.shapes[0].x0 == 0.2 and fig.layout.shapes[0].y1 == 0.0
    assert figures.expert_conflict_map(table.iloc[:0]).layout.annotations  # says why there is nothing
