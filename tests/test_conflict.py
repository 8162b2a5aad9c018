"""Gradient conflict: every logged figure against a brute-force reference (one zeroed backward per task).

The reference trains a twin of the model without gatewatch in lockstep; for each step it runs one
backward per task on zeroed gradients and computes cosines, sign disagreement, norms, magnitude
similarity, the Recon-style count and GradDrop's purity histogram with plain numpy.
"""

from __future__ import annotations

import copy
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import batch, task_losses, tiny_mmoe, train
from torch import nn

import gatewatch as gw
from gatewatch.cli import main as cli_main
from gatewatch.models import CGC, PLE, MMoE
from gatewatch.quantities.conflict.layout import ConflictError, module_grouper, select_shared
from gatewatch.quantities.conflict.maths import PURITY_BINS, UnitRuns, histogram_plan, purity_counts

LossFn = Callable[[nn.Module, int], dict[str, torch.Tensor]]
Grads = dict[str, dict[str, np.ndarray]]  # task -> parameter name -> flat float64 gradient (zeros when unreached)


# ---------------------------------------------------------------------------------------------- reference
def task_grads(model: nn.Module, micro_batches: Sequence[Callable[[], dict[str, torch.Tensor]]],
               tasks: Sequence[str]) -> tuple[Grads, dict[str, set[str]]]:
    """Each task's gradient by its own backward on zeroed gradients, summed over the micro-batches."""
    grads: Grads = {}
    reached: dict[str, set[str]] = {}
    for task in tasks:
        model.zero_grad(set_to_none=True)
        for losses_of in micro_batches:
            losses_of()[task].backward()
        grads[task] = {n: (p.grad.double().flatten().cpu().numpy().copy() if p.grad is not None
                           else np.zeros(p.numel())) for n, p in model.named_parameters()}
        reached[task] = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, reached


def pair_reference(ga: np.ndarray, gb: np.ndarray) -> dict[str, float | bool]:
    na, nb = float(np.linalg.norm(ga)), float(np.linalg.norm(gb))
    zero = na == 0 or nb == 0
    return {
        "cosine": 0.0 if zero else float(ga @ gb) / (na * nb), "sign_conflict": float(np.mean(ga * gb < 0)),
        "norm_a": na, "norm_b": nb, "magnitude_sim": 0.0 if zero else 2 * na * nb / (na**2 + nb**2),
        "zero_grad": zero, "elements": ga.size,
    }


def purity_reference(vectors: Sequence[np.ndarray]) -> np.ndarray:
    g = np.stack(vectors)
    total, magnitude = g.sum(0), np.abs(g).sum(0)
    defined = magnitude > 0
    purity = 0.5 * (1 + total[defined] / magnitude[defined])
    return np.histogram(purity, bins=PURITY_BINS, range=(0.0, 1.0))[0].astype(float)


def reference_tables(steps: list[tuple[int, Grads]], tasks: Sequence[str], shared: Sequence[str],
                     group_of: Callable[[str], str], threshold: float = 0.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The conflict and purity rows gatewatch should log, from per-task gradients of each measured step."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in shared:
        groups[group_of(name)].append(name)
    scopes = [("param", n, [n]) for n in shared] + [("module", g, m) for g, m in groups.items()] + [
        ("all", "all", list(shared))]
    below: dict[tuple[str, str, str, str], int] = defaultdict(int)
    rows, hist = [], []
    for step, grads in steps:
        for scope, name, members in scopes:
            vec = {t: np.concatenate([grads[t][m] for m in members]) for t in tasks}
            for i, a in enumerate(tasks):
                for b in tasks[i + 1 :]:
                    ref = pair_reference(vec[a], vec[b])
                    below[(scope, name, a, b)] += int(ref["cosine"] < threshold and not ref["zero_grad"])
                    rows.append({"step": step, "scope": scope, "name": name, "task_a": a, "task_b": b, **ref,
                                 "below": below[(scope, name, a, b)]})
            if scope != "param":
                counts = purity_reference([vec[t] for t in tasks])
                hist += [{"step": step, "scope": scope, "name": name, "bin": k, "count": c}
                         for k, c in enumerate(counts)]
    return pd.DataFrame(rows), pd.DataFrame(hist)


def compare(logged: pd.DataFrame, expected: pd.DataFrame, keys: Sequence[str], *, sign_slack: int = 0) -> None:
    """Every column of ``expected`` against the logged rows with the same keys."""
    merged = expected.merge(logged, on=list(keys), how="left", suffixes=("", "_got"), indicator=True)
    missing = merged[merged["_merge"] != "both"]
    assert not len(missing), f"rows not logged:\n{missing[list(keys)].head()}"
    assert len(logged) == len(expected), f"{len(logged)} rows logged, {len(expected)} expected"
    for col in [c for c in expected.columns if c not in keys]:
        got, want = merged[f"{col}_got"].to_numpy(), merged[col].to_numpy()
        if col in ("zero_grad", "elements", "below", "count"):
            slack = sign_slack if col == "count" else 0
            assert np.abs(got.astype(float) - want.astype(float)).max() <= slack, f"{col} differs"
        elif col == "sign_conflict":
            assert np.all(np.abs(got - want) * merged["elements"].to_numpy() <= sign_slack + 1e-9), col
        elif col in ("norm_a", "norm_b"):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12, err_msg=col)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=col)


def data_losses(n: int = 32) -> LossFn:
    def losses(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        tasks = list(model.tasks)
        x, y = batch(step, n, model_in_dim(model))
        device = next(model.parameters()).device
        return task_losses(model(x.to(device)), y.to(device), tasks)

    return losses


def model_in_dim(model: nn.Module) -> int:
    return int(getattr(model, "config", {}).get("in_dim") or model.experts[0][0].in_features)


def run_with_reference(model: nn.Module, tmp_path: Path, *, steps: int = 4, losses: LossFn | None = None,
                       **watch_kwargs) -> tuple[gw.Run, list[tuple[int, Grads]], dict[str, set[str]]]:
    """Train ``model`` with a watch and, in lockstep, compute each step's per-task gradients on a twin."""
    losses = losses or data_losses()
    tasks = list(model.tasks)
    twin = copy.deepcopy(model)
    watch_kwargs.setdefault("conflict_every", 1)
    watch = gw.GateWatch(model, tasks=tasks, log_dir=tmp_path / "run", tensorboard=False, flush_every=3,
                         **watch_kwargs)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    measured, reached = [], {}
    for step in range(1, steps + 1):
        if watch.conflict_due:
            twin.load_state_dict(model.state_dict())
            grads, reached = task_grads(twin, [lambda s=step: losses(twin, s)], tasks)
            measured.append((step, grads))
        watch.backward(losses(model, step))
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    return gw.load_run(tmp_path / "run"), measured, reached


def shared_by_reference(reached: dict[str, set[str]], model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if sum(n in r for r in reached.values()) >= 2]


def check_against_reference(run: gw.Run, measured: list[tuple[int, Grads]], tasks: Sequence[str],
                            shared: Sequence[str], group_of: Callable[[str], str], *, sign_slack: int = 0) -> None:
    rows, hist = reference_tables(measured, tasks, shared, group_of)
    conflict, purity = run.table("conflict"), run.table("purity")
    assert not conflict.drop(columns=["zero_grad"]).isna().any().any(), "NaN in the conflict table"
    compare(conflict, rows, ["step", "scope", "name", "task_a", "task_b"], sign_slack=sign_slack)
    compare(purity[["step", "scope", "name", "bin", "count"]], hist, ["step", "scope", "name", "bin"],
            sign_slack=sign_slack)
    assert sorted(run.meta["conflict"]["shared"]) == sorted(shared)


def expert_group(name: str) -> str:
    """Independent statement of the expected groups: the expert a parameter belongs to."""
    match = re.match(r"^(experts\.\d+|levels\.\d+\.shared\.\d+|levels\.\d+\.specific\.\w+\.\d+)\.", name)
    assert match, name
    return match.group(1)


# ---------------------------------------------------------------------------------------------- figures
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.slow
def test_mmoe_three_tasks_every_figure_matches_reference(tmp_path: Path, device: str) -> None:
    torch.manual_seed(0)
    model = MMoE(in_dim=6, tasks=["a", "b", "c"], n_experts=3, expert_hidden=(5,), expert_dim=4, tower_hidden=(3,))
    run, measured, reached = run_with_reference(model.to(device), tmp_path, steps=4)
    shared = shared_by_reference(reached, model)
    assert shared == [n for n, _ in model.named_parameters() if n.startswith("experts.")]  # no gate, no tower
    check_against_reference(run, measured, ["a", "b", "c"], shared, expert_group, sign_slack=1)
    assert set(run.table("conflict")["scope"]) == {"param", "module", "all"}


def test_cgc_task_experts_are_not_shared(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = CGC(in_dim=6, tasks=["a", "b"], n_specific=1, n_shared=2, expert_hidden=(5,), expert_dim=4,
                tower_hidden=(3,))
    run, measured, reached = run_with_reference(model, tmp_path, steps=3)
    shared = shared_by_reference(reached, model)
    assert shared == [n for n, _ in model.named_parameters() if n.startswith("levels.0.shared.")]
    check_against_reference(run, measured, ["a", "b"], shared, expert_group)


def test_ple_shared_gate_makes_first_level_task_experts_shared(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = PLE(in_dim=6, tasks=["a", "b"], n_levels=2, expert_hidden=(5,), expert_dim=4, tower_hidden=(3,))
    with gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / "run", tensorboard=False,
                      conflict_every=1) as watch:
        train_steps(model, watch, data_losses(), 1)
    expected = [n for n, _ in model.named_parameters()
                if re.match(r"levels\.0\.(specific|shared|shared_gate)\.|levels\.1\.shared\.", n)]
    assert sorted(watch.conflict.layout.names) == sorted(expected)
    groups = set(gw.load_run(tmp_path / "run").table("conflict").query("scope == 'module'")["name"])
    assert groups == {"levels.0.specific.a.0", "levels.0.specific.b.0", "levels.0.shared.0", "levels.0.shared_gate",
                      "levels.1.shared.0"}


@pytest.mark.slow
@pytest.mark.parametrize("zero_task", ["like", "ctr"])  # the last task (by subtraction) or a computed one
def test_zero_gradient_is_flagged_not_nan(tmp_path: Path, zero_task: str) -> None:
    model = tiny_mmoe(in_dim=6, n_experts=3, hidden=4)
    model.force_gate(zero_task, [0.0, 0.0, -float("inf")], freeze=False)  # expert 2 gets exactly 0 from zero_task
    run, measured, _ = run_with_reference(model, tmp_path, steps=3, shared=["experts", "towers.ctr"])
    shared = [n for n, _ in model.named_parameters() if n.startswith(("experts.", "towers.ctr."))]
    check_against_reference(run, measured, ["ctr", "like"], shared, module_grouper(model))
    conflict = run.table("conflict")
    flagged = set(conflict.loc[conflict["zero_grad"], "name"])
    assert flagged == {"experts.2.0.weight", "experts.2.0.bias", "experts.2", "towers.ctr.weight",
                       "towers.ctr.bias", "towers.ctr"}
    assert (conflict.loc[conflict["zero_grad"], ["cosine", "magnitude_sim"]] == 0.0).all().all()


def test_module_groups_depth_callable_and_param_limit(tmp_path: Path) -> None:
    model = tiny_mmoe(in_dim=6, n_experts=3, hidden=4)
    run, measured, reached = run_with_reference(model, tmp_path, steps=2, conflict_group=lambda n: n.split(".")[1],
                                                conflict_param_limit=0)
    shared = shared_by_reference(reached, model)
    rows, _ = reference_tables(measured, ["ctr", "like"], shared, lambda n: n.split(".")[1])
    rows = rows[rows["scope"] != "param"]
    compare(run.table("conflict"), rows, ["step", "scope", "name", "task_a", "task_b"])
    depth = module_grouper(model, 1)
    assert {depth(n) for n in shared} == {"experts"}


def test_shared_accepts_names_prefixes_and_modules() -> None:
    model = tiny_mmoe(n_experts=12)
    expert1 = [n for n, _ in model.named_parameters() if n.startswith("experts.1.")]
    assert select_shared(model, "experts.1") == expert1  # a prefix ends at a dot: experts.10 is not in it
    assert select_shared(model, model.experts[1]) == expert1
    assert select_shared(model, ["experts.1.0.weight", model.experts[1]]) == expert1
    assert select_shared(model, None) is None
    with pytest.raises(ConflictError, match="shared= is empty"):
        select_shared(model, [])


# ---------------------------------------------------------------------------------------------- training
def train_steps(model: nn.Module, watch: gw.GateWatch, losses: LossFn, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(1, steps + 1):
        watch.backward(losses(model, step))
        opt.step()
        opt.zero_grad()
        watch.step()


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.slow
def test_conflict_changes_no_trained_parameter(tmp_path: Path, every: int) -> None:
    plain = train(tiny_mmoe(), None, 7)
    watched_model = tiny_mmoe()
    with gw.GateWatch(watched_model, tasks=["ctr", "like"], log_dir=tmp_path / "run", tensorboard=False,
                      conflict_every=every) as watch:
        train(watched_model, watch, 7)
    for (name, a), b in zip(plain.named_parameters(), watched_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    steps = sorted(gw.load_run(tmp_path / "run").table("conflict")["step"].unique())
    assert steps == [s for s in range(1, 8) if s % every == 0]


def test_callable_schedule_and_off(tmp_path: Path) -> None:
    model = tiny_mmoe()
    with gw.GateWatch(model, tasks=["ctr", "like"], log_dir=tmp_path / "on", tensorboard=False,
                      conflict_every=lambda step: step in (2, 5)) as watch:
        train(model, watch, 6)
    assert sorted(gw.load_run(tmp_path / "on").table("conflict")["step"].unique()) == [2, 5]
    with gw.GateWatch(model, tasks=["ctr", "like"], log_dir=tmp_path / "off", tensorboard=False) as watch:
        assert watch.conflict is None and not watch.conflict_due
        train(model, watch, 2)
    assert not len(gw.load_run(tmp_path / "off").table("conflict"))


def test_own_backward_with_loss_scale_and_accumulation(tmp_path: Path) -> None:
    """AMP-style scaled backward, two micro-batches per step: the figures are those of the summed gradient."""
    model = tiny_mmoe(in_dim=6, n_experts=3, hidden=4)
    twin = copy.deepcopy(model)
    tasks, scale = ["ctr", "like"], 1024.0
    losses = data_losses(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    measured = []
    with gw.GateWatch(model, tasks=tasks, log_dir=tmp_path / "run", tensorboard=False, conflict_every=1) as watch:
        for step in range(1, 4):
            twin.load_state_dict(model.state_dict())
            grads, _ = task_grads(twin, [lambda m=m, s=step: losses(twin, 10 * s + m) for m in range(2)], tasks)
            measured.append((step, grads))
            for micro in range(2):
                with watch.task_gradients(losses(model, 10 * step + micro)) as total:
                    (total * scale).backward()
            for p in model.parameters():
                p.grad /= scale
            opt.step()
            opt.zero_grad()
            watch.step()
    shared = [n for n, _ in model.named_parameters() if n.startswith("experts.")]
    check_against_reference(gw.load_run(tmp_path / "run"), measured, tasks, shared, expert_group, sign_slack=1)


def test_block_without_backward_raises(tmp_path: Path) -> None:
    model = tiny_mmoe()
    with gw.GateWatch(model, tasks=["ctr", "like"], log_dir=tmp_path / "run", tensorboard=False,
                      conflict_every=1) as watch:
        x, y = batch(0)
        with pytest.raises(RuntimeError, match="did not run inside"), watch.task_gradients(
                task_losses(model(x), y, model.tasks)):
            pass


def test_no_shared_parameter_turns_conflict_off_with_a_warning(tmp_path: Path) -> None:
    class Separate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tasks = ["a", "b"]
            self.gates = nn.ModuleDict({t: nn.Sequential(nn.Linear(3, 2), nn.Softmax(-1)) for t in self.tasks})
            self.towers = nn.ModuleDict({t: nn.Linear(2, 1) for t in self.tasks})

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [self.towers[t](self.gates[t](x)).squeeze(-1) for t in self.tasks]

    model = Separate()
    with gw.GateWatch(model, tasks=model.tasks, log_dir=tmp_path / "run", tensorboard=False,
                      conflict_every=1) as watch, pytest.warns(RuntimeWarning, match="no parameter receives"):
        for step in range(3):
            x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
            out = model(x)
            watch.backward({"a": out[0].pow(2).mean(), "b": out[1].abs().mean()})
            watch.step()
    assert not len(gw.load_run(tmp_path / "run").table("conflict"))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"conflict_every": -1}, "conflict_every must be"),
    ({"conflict_every": 1, "shared": ["nothing.here"]}, "matches no trainable parameter"),
    ({"conflict_every": 1, "conflict_threshold": 0.5}, r"in \(-1, 0\]"),
    ({"conflict_every": 1, "conflict_group": 0}, "conflict_group must be"),
    ({"conflict_every": 1, "tasks": ["ctr"]}, "has one"),
])
def test_bad_settings_fail_early_with_the_fix(tmp_path: Path, kwargs: dict, match: str) -> None:
    kwargs = {"tasks": ["ctr", "like"], **kwargs}
    with pytest.raises((ValueError, ConflictError), match=match):
        gw.GateWatch(tiny_mmoe(), log_dir=tmp_path / "run", tensorboard=False, **kwargs)


# ---------------------------------------------------------------------------------------------- report
class OneHead(nn.Module):
    """Experts, a gate per task and ONE head for both tasks: opposite targets make the tasks fight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.tasks = ["up", "down"]
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(4, 6), nn.ReLU()) for _ in range(2))
        self.gates = nn.ModuleDict({t: nn.Sequential(nn.Linear(4, 2), nn.Softmax(-1)) for t in self.tasks})
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = torch.stack([e(x) for e in self.experts], 1)
        return [self.head((self.gates[t](x).unsqueeze(-1) * f).sum(1)).squeeze(-1) for t in self.tasks]


def test_report_lists_pairs_and_finds_persistent_conflict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = OneHead()

    def losses(m: nn.Module, step: int) -> dict[str, torch.Tensor]:
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(step))
        out = m(x)
        return {"up": (out[0] - x[:, 0]).pow(2).mean(), "down": (out[1] + x[:, 0]).pow(2).mean()}

    with gw.GateWatch(model, tasks=model.tasks, log_dir=tmp_path / "run", conflict_every=2) as watch:
        train_steps(model, watch, losses, 12)
    cli_main(["report", str(tmp_path / "run"), "--json"])
    report = json.loads(capsys.readouterr().out)
    (pair,) = report["conflict"]
    assert pair["tasks"] == ["up", "down"] and pair["step"] == 12 and pair["measured"] == 6
    assert pair["cosine"] < 0 and 0 < pair["sign_conflict"] <= 1 and not pair["zero_grad"]
    assert {h["name"] for h in pair["hot_spots"]} <= {"experts.0", "experts.1", "head"}
    assert any(f["code"] == "conflict" and f["chart"] == "conflict" for f in report["findings"])
    tags = tensorboard_tags(tmp_path / "run" / "tensorboard")
    assert {"conflict/up~down/cosine", "conflict/up~down/module/head/cosine", "conflict/norm/up"} <= tags["scalars"]
    assert "conflict/purity" in tags["histograms"]


def tensorboard_tags(folder: Path) -> dict[str, set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {k: set(v) for k, v in acc.Tags().items() if k in ("scalars", "histograms")}


def test_purity_of_a_tiled_range_is_the_sum_of_its_tiles_and_equals_direct_counting():
    bounds = [(0, 2), (2, 5), (0, 5), (5, 9), (0, 9), (3, 7)]
    plan = dict(histogram_plan(tuple(bounds)))
    assert plan[2] == [0, 1] and plan[4] == [0, 1, 3] and plan[5] is None and plan[0] is None
    g = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    g[:, 4] = 0  # an element no task touches: the extra column
    got = purity_counts(g.clone(), bounds, PURITY_BINS)
    for i, (s, e) in enumerate(bounds):
        expect = purity_counts(g[:, s:e].clone(), [(0, e - s)], PURITY_BINS)[0]
        assert torch.equal(got[i], expect), (i, got[i], expect)


def test_batched_grams_match_numpy_on_every_unit_whatever_their_sizes_and_spacing():
    """Runs of equal-size units at even spacing become one bmm each; uneven spacing, lone sizes and a buffer that
    starts inside its storage give the same Gram matrices as numpy unit by unit."""
    sizes = [7, 3, 7, 3, 7, 3, 5, 7, 2, 7, 3]  # 7s start at 0, 10, 20, 35, 44; 3s at 7, 17, 27, 51
    units, at = [], 0
    for n in sizes:
        units.append((at, at + n))
        at += n
    plan = UnitRuns.plan(units)
    assert sorted(plan.runs) == [(0, 7, 10, 3), (7, 3, 10, 3), (30, 5, 5, 1), (35, 7, 9, 2), (42, 2, 2, 1),
                                 (51, 3, 3, 1)]
    storage = torch.randn(3 + 4, at + 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = storage[3:, 6:]  # K = 4 rows, offset in its storage, rows strided by the storage's width
    got = plan.grams(g).numpy()
    rows = g.numpy()
    for i, (s, e) in enumerate(units):
        np.testing.assert_allclose(got[i], rows[:, s:e] @ rows[:, s:e].T, rtol=1e-12)
