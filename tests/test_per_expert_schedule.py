"""Per-expert rows of a wide model are kept in the first window, every K-th and the run's last; the report and the
findings read the last window that has them, and equal those of the same training with every window kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _wide_routers import WideRouters

import gatewatch as gw
from gatewatch.capture import per_expert
from gatewatch.capture.per_expert import PerExpertSchedule, per_expert_due, per_expert_every
from gatewatch.loaded_run import Run
from gatewatch.report import build_report, render_text
from gatewatch.run_reader import load_run

LAYERS, EXPERTS, TOP_K, TOKENS, STEPS = 4, 16, 2, 64, 11
SPEC = gw.Router("softmax", TOP_K, renormalize=True)
GROUPS = ["code", "maths", "chat"]
BUDGET = 20  # 4 x 16 = 64 values a window: K = 4 for shares and router_experts; 4 x 3 x 16 = 192: K = 10 for groups
PER_EXPERT = ("shares", "router_experts")


def test_every_is_one_up_to_the_budget_and_averages_within_it_above() -> None:
    assert per_expert_every(8 * 64) == 1  # every model up to 8 gates x 64 experts keeps every window
    assert per_expert_every(8 * 64 + 1) == 2
    assert per_expert_every(48 * 128) == 12 and per_expert.PER_EXPERT_BUDGET >= 48 * 128 / 12
    assert per_expert_every(100, budget=10) == 10 and per_expert_every(101, budget=10) == 11
    assert per_expert_every(0) == 1
    due = per_expert_due(np.arange(10), 64, budget=20)  # K = 4
    assert np.flatnonzero(due).tolist() == [0, 4, 8]
    assert per_expert_due(np.arange(5), 10_000, every=2).tolist() == [True, False, True, False, True]
    assert bool(per_expert_due(0, 10**9))  # the first window, however wide


def test_the_schedule_keeps_the_first_every_kth_and_the_last_across_flushes() -> None:
    schedule = PerExpertSchedule(budget=20)
    kept = [schedule.due(3, 64), schedule.due(3, 64)]  # windows 0-5 in two flushes: 0 and 4
    schedule.close()
    kept.append(schedule.due(3, 64))  # windows 6-8, the last flush: 8 (K) and the last (8)
    assert np.flatnonzero(np.concatenate(kept)).tolist() == [0, 4, 8]
    schedule = PerExpertSchedule(budget=20)
    schedule.due(2, 64)
    schedule.close()
    assert schedule.due(1, 64).tolist() == [True] and schedule.every == 4  # window 2: kept as the run's last
    assert PerExpertSchedule(every=3).due(4, 1).tolist() == [True, False, False, True]


def train(path: Path) -> Path:
    torch.manual_seed(0)
    model = WideRouters(LAYERS, 8, EXPERTS, SPEC).train()
    gates = {f"backbone.layers.{i}.mlp.gate": gw.Gate(f"layers.{i}", router=SPEC) for i in range(LAYERS)}
    watch = gw.GateWatch(model, gates=gates, log_dir=path, every=1, flush_every=3, tensorboard=False,
                         sample_groups=GROUPS, coactivation=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        with watch.grouped(torch.randint(0, len(GROUPS), (TOKENS,), generator=gen)):
            loss = model(torch.randn(TOKENS, 8, generator=gen))
        loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("per_expert")
    full = train(root / "full")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(per_expert, "PER_EXPERT_BUDGET", BUDGET)
        sparse = train(root / "sparse")
    return full, sparse


@pytest.mark.slow
def test_a_wide_run_keeps_the_first_every_kth_and_the_last_window(runs: tuple[Path, Path]) -> None:
    full, sparse = load_run(runs[0]), load_run(runs[1])
    steps = list(range(1, STEPS + 1))  # every=1: one window per step
    for name in PER_EXPERT:
        assert sorted(full.table(name)["step"].unique()) == steps
        assert sorted(sparse.table(name)["step"].unique()) == [1, 5, 9, 11]  # windows 0, 4, 8 and the last
        kept = full.table(name)[full.table(name)["step"].isin([1, 5, 9, 11])].reset_index(drop=True)
        pd.testing.assert_frame_equal(sparse.table(name).reset_index(drop=True), kept)
    for name in ("gates", "routers", "hist"):  # the aggregates: every window, as before
        pd.testing.assert_frame_equal(sparse.table(name), full.table(name))
    routing = sparse.table("group_routing")
    assert sorted(routing.loc[routing["share"].notna(), "step"].unique()) == [1, 11]  # K = 10: windows 0, 10
    assert sorted(routing["step"].unique()) == steps
    meta = json.loads((runs[1] / "run.json").read_text())
    assert meta["per_expert_every"] == {"shares": 4, "router_experts": 4, "group_routing": 10}
    assert json.loads((runs[0] / "run.json").read_text())["per_expert_every"] == {
        "shares": 1, "router_experts": 1, "group_routing": 1}


def test_the_report_and_findings_equal_those_of_every_window_kept(runs: tuple[Path, Path]) -> None:
    full, sparse = build_report(load_run(runs[0])), build_report(load_run(runs[1]))
    assert any(f["code"] == "router_dead" for f in full["findings"])
    for key in ("findings", "balance", "gates", "experts", "group_routing", "group_specialisation"):
        assert sparse[key] == full[key], key


def test_a_live_run_reads_the_last_window_with_per_expert_rows_and_says_which(runs: tuple[Path, Path]) -> None:
    """A run still running: its last window (step 11) has no per-expert rows yet; the findings and the balance use
    step 9's, say so, and equal the full run's figures at step 9."""
    full, sparse = load_run(runs[0]), load_run(runs[1])
    tables = {n: t[t["step"] != 11] if n in PER_EXPERT else t for n, t in sparse.tables.items()}
    live = build_report(Run.of_tables(sparse.path, sparse.meta, tables, "live"))
    tables = {n: t[t["step"] <= 9] for n, t in full.tables.items()}
    at_9 = build_report(Run.of_tables(full.path, full.meta, tables, "finished"))
    dead = [f for f in live["findings"] if f["code"] == "router_dead"]
    assert dead and all(f["step"] == 9 and "at step 9 (the last window with per-expert rows)" in f["message"]
                        for f in dead)
    assert [f["value"] for f in dead] == [f["value"] for f in at_9["findings"] if f["code"] == "router_dead"]
    for b, ref in zip(live["balance"], at_9["balance"], strict=True):
        assert b["step"] == 11 and b["expert_step"] == 9
        assert b["load"] == ref["load"] and b["dead"] == ref["dead"] and b["dropped"] == ref["dropped"]
    for g, ref in zip(live["gates"], at_9["gates"], strict=True):
        assert g["expert_step"] == 9 and g["expert_share"] == ref["expert_share"]
    layer_lines = [line for line in render_text(live).splitlines()
                   if line.startswith("  backbone.layers.") and "MaxVio" in line]
    assert len(layer_lines) == LAYERS and all("(per-expert at step 9)" in line for line in layer_lines)
