"""gatewatch.figures on real runs (tiny models trained under GateWatch) and on edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from _runs_factory import conflict_frame, write_synthetic_run

import gatewatch as gw
from gatewatch import figures
from gatewatch.figures._style import natural_key, step_buckets
from gatewatch.schema import frame


@pytest.fixture(scope="session")
def runs(standard_run_dirs: dict[str, Path]) -> dict[str, gw.Run]:
    return {name: gw.load_run(p) for name, p in standard_run_dirs.items()}


@pytest.fixture(scope="session")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> gw.Run:
    """A synthetic run long enough to be downsampled (5,000 windows per gate)."""
    path = write_synthetic_run(tmp_path_factory.mktemp("long") / "long", steps=50_000, every=10, tasks=2, experts=4,
                               conflict_every=50, params=6, parts=4)
    return gw.load_run(path)


def all_figures(run: gw.Run) -> dict[str, go.Figure]:
    gate = run.gate_names[0]
    conflict = run.table("conflict")
    pair = figures.pairs(conflict)[0] if len(conflict) else "a ~ b"
    return {
        "share_area": figures.share_area(run.shares, gate),
        "share_heatmap": figures.share_heatmap(run.shares, gate),
        "gate_curves": figures.gate_curves(run.gates),
        "weight_histogram": figures.weight_histogram(run.hist),
        "task_expert_matrix": figures.task_expert_matrix(run.shares, gates=run.gates),
        "utilization_over_time": figures.utilization_over_time(run.experts),
        "utilization_at_step": figures.utilization_at_step(run.experts),
        "utilization_by_task": figures.utilization_by_task(run.shares, gates=run.gates),
        "load_balance": figures.load_balance(run.experts),
        "cosine_all": figures.cosine_over_time(conflict),
        "cosine_module": figures.cosine_over_time(conflict, scope="module", pair=pair),
        "cosine_heatmap": figures.cosine_heatmap(conflict, pair),
        "conflict_ranking": figures.conflict_ranking(conflict, pair=pair),
        "sign_conflict": figures.sign_conflict_over_time(conflict),
        "purity": figures.purity_distribution(run.table("purity")),
        "losses": figures.loss_curves({run.name: run.losses}),
    }


def trace_values(trace: go.BaseTraceType) -> np.ndarray:
    """The numeric values a trace draws (z of a heatmap, y of a line or bar, x of a horizontal bar)."""
    for attr in ("z", "y", "x"):
        values = getattr(trace, attr, None)
        if values is None:
            continue
        try:
            return np.asarray(values, dtype=float)
        except ValueError:  # category labels
            continue
    return np.array([])


def is_no_data(fig: go.Figure) -> bool:
    return not fig.data and len(fig.layout.annotations) == 1


@pytest.mark.parametrize("name", ["polarized", "one_expert", "routers", "corrupt",  # the fast lane draws these
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ("healthy", "one_task",
                                                                                       "cut_off"))])
@pytest.mark.slow
def test_every_figure_is_readable(runs: dict[str, gw.Run], name: str) -> None:
    for key, fig in all_figures(runs[name]).items():
        assert fig.layout.title.text, key
        if is_no_data(fig):
            assert fig.layout.annotations[0].text, key  # says why there is nothing
            continue
        assert fig.data, key
        for trace in fig.data:
            values = trace_values(trace)
            assert values.size and not np.isnan(values).all(), f"{key}: trace {trace.name!r} is all NaN"
        axes = [fig.layout[a] for a in fig.layout if a.startswith(("xaxis", "yaxis"))]
        assert any(ax.title.text for ax in axes if a_x(ax)), f"{key}: no x axis title"
        assert any(ax.title.text for ax in axes if not a_x(ax)), f"{key}: no y axis title"


def a_x(axis: object) -> bool:
    return type(axis).__name__ == "XAxis"


@pytest.mark.slow
def test_conflict_figures_need_conflict_data(runs: dict[str, gw.Run]) -> None:
    drawn = all_figures(runs["one_task"])
    for key in ("cosine_all", "cosine_heatmap", "conflict_ranking", "sign_conflict"):
        fig = drawn[key]
        assert is_no_data(fig)
        assert "conflict_every" in fig.layout.annotations[0].text
    assert not is_no_data(all_figures(runs["healthy"])["cosine_all"])


def test_share_area_stacks_the_gate_shares(runs: dict[str, gw.Run]) -> None:
    run = runs["polarized"]
    fig = figures.share_area(run.shares, "like")
    assert [t.name for t in fig.data] == [f"expert {i}" for i in range(4)]
    stacked = np.sum([np.asarray(t.y, dtype=float) for t in fig.data], axis=0)
    np.testing.assert_allclose(stacked, 1.0, atol=1e-5)
    assert np.asarray(fig.data[0].y, dtype=float)[-1] > 0.99  # the pinned expert takes all the weight


def test_task_expert_matrix_holds_the_shares_of_the_step(runs: dict[str, gw.Run]) -> None:
    run = runs["healthy"]
    step = int(run.shares["step"].unique()[3])
    fig = figures.task_expert_matrix(run.shares, step + 3, gates=run.gates)  # falls back to the window at `step`
    assert f"step {step}" in fig.layout.title.text
    rows = run.shares[run.shares["step"] == step]
    expected = rows.pivot_table(index="gate", columns="expert_name", values="share")
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), expected.to_numpy(), rtol=1e-12)
    assert list(fig.data[0].y) == ["ctr", "like"]


def test_expert_colours_agree_across_figures(runs: dict[str, gw.Run]) -> None:
    run = runs["healthy"]
    area = {t.name: t.line.color for t in figures.share_area(run.shares, "ctr").data}
    lines = {t.name: t.line.color for t in figures.utilization_over_time(run.experts).data if t.name in area}
    assert len(lines) == 4
    assert lines == {name: area[name] for name in lines}


def test_gate_curves_show_polarization(runs: dict[str, gw.Run]) -> None:
    fig = figures.gate_curves(runs["polarized"].gates)
    top = {t.name: np.asarray(t.y, dtype=float) for t in fig.data if t.yaxis == "y3" and t.line.dash is None}
    assert top["like"][-1] > 0.99
    assert top["ctr"][-1] < 0.9


def test_weight_histogram_is_a_distribution(runs: dict[str, gw.Run]) -> None:
    fig = figures.weight_histogram(runs["healthy"].hist, 50)
    assert "step 50" in fig.layout.title.text
    for trace in fig.data:
        assert math.isclose(float(np.sum(trace.y)), 1.0, rel_tol=1e-9)


def test_routers_are_drawn_per_layer(runs: dict[str, gw.Run]) -> None:
    run = runs["routers"]
    fig = figures.task_expert_matrix(run.shares, gates=run.gates)
    assert list(fig.data[0].y) == ["layer0", "layer1"]
    assert len(fig.data[0].x) == 8  # each layer owns its 4 experts
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z).sum() == 8  # a layer does not mix the other layer's experts


@pytest.mark.slow
def test_downsampling_averages_buckets_of_steps(long_run: gw.Run) -> None:
    gates = long_run.gates
    assert gates["step"].nunique() == 5000
    fig = figures.gate_curves(gates, max_points=1000)
    for trace in fig.data:
        assert len(trace.x) <= 1000
    series = gates[gates["gate"] == "task0"].sort_values("step")
    out = figures.downsample(series, ["gate"], ["entropy"], 1000)
    width = 5  # 5000 steps into 1000 buckets
    expected = series["entropy"].to_numpy().reshape(-1, width).mean(1)
    np.testing.assert_allclose(out["entropy"].to_numpy(), expected)
    np.testing.assert_array_equal(out["step"].to_numpy(), series["step"].to_numpy()[width - 1::width])


def test_step_buckets_keep_short_series() -> None:
    steps = pd.Series([10, 20, 30, 30])
    assert step_buckets(steps, 5).tolist() == [10, 20, 30, 30]
    assert step_buckets(pd.Series(range(1, 11)), 3).tolist() == [4] * 4 + [8] * 4 + [10] * 2


def test_heatmaps_are_capped_in_columns(long_run: gw.Run) -> None:
    fig = figures.share_heatmap(long_run.shares, "task0", max_columns=300)
    assert len(fig.data[0].x) <= 300
    fig = figures.cosine_heatmap(long_run.table("conflict"), "task0 ~ task1", max_columns=200)
    assert len(fig.data[0].x) <= 200
    assert fig.data[0].zmid == 0


def test_dead_expert_is_marked(long_run: gw.Run) -> None:
    assert figures.dead_experts(long_run.experts, 0.1) == ["3"]
    names = [t.name for t in figures.utilization_over_time(long_run.experts).data]
    assert "expert 3 (dead)" in names and "expert 0" in names
    bars = figures.utilization_at_step(long_run.experts).data[0]
    assert list(bars.text) == ["", "", "", "dead"]


def test_load_balance_matches_the_report(runs: dict[str, gw.Run]) -> None:
    run = runs["polarized"]
    cv = figures.load_balance(run.experts).data[0]
    assert math.isclose(float(cv.y[-1]), gw.build_report(run)["experts"]["load_cv"], rel_tol=1e-9)
    one = figures.load_balance(runs["one_expert"].experts).data[0]
    assert np.allclose(np.asarray(one.y, dtype=float), 0.0)  # one expert carries everything: perfectly "even"


def test_conflict_ranking_follows_the_recon_count() -> None:
    conflict = conflict_frame(list(range(10, 210, 10)), ["a", "b"], ["m.0.w", "m.0.b", "m.1.w"], fight=["m.1.w"])
    counts = figures.conflict_counts(conflict, pair="a ~ b")
    assert counts["name"].iloc[0] == "m.1.w"
    last = conflict[(conflict["scope"] == "param") & (conflict["step"] == 200)].set_index("name")["below"]
    assert counts.set_index("name")["count"].to_dict() == {k: float(v) for k, v in last.items()}
    fig = figures.conflict_ranking(conflict, pair="a ~ b")
    assert list(fig.data[0].y)[-1] == "m.1.w"  # bars run bottom-up: the worst is on top


def test_conflict_counts_fall_back_to_negative_cosines() -> None:
    conflict = conflict_frame([10, 20, 30], ["a", "b"], ["m.0.w"])
    conflict["below"] = pd.array([pd.NA] * len(conflict), dtype="Int64")
    counts = figures.conflict_counts(conflict, pair="a ~ b").set_index("name")
    rows = conflict[(conflict["scope"] == "param")]
    assert counts.loc["m.0.w", "count"] == float((rows["cosine"] < 0).sum())


def test_compare_draws_one_line_per_run_and_panel(runs: dict[str, gw.Run]) -> None:
    chosen = {k: runs[k] for k in ("healthy", "polarized")}
    fig = figures.compare_gate_metric({k: r.gates for k, r in chosen.items()}, "top_share")
    assert sorted(a.text for a in fig.layout.annotations) == ["ctr", "like"]
    assert len(fig.data) == 4
    assert {t.name for t in fig.data} == {"healthy", "polarized"}
    fig = figures.compare_conflict({k: r.table("conflict") for k, r in chosen.items()})
    assert {t.name for t in fig.data} == {"healthy", "polarized"}
    with pytest.raises(ValueError, match="metric must be one of"):
        figures.compare_gate_metric({"a": runs["healthy"].gates}, "nope")


def test_empty_tables_give_figures_that_say_so() -> None:
    empty = {name: frame(name) for name in ("gates", "shares", "hist", "experts", "losses", "conflict", "purity")}
    for fig in [
        figures.share_area(empty["shares"], "g"), figures.share_heatmap(empty["shares"], "g"),
        figures.gate_curves(empty["gates"]), figures.weight_histogram(empty["hist"]),
        figures.task_expert_matrix(empty["shares"]), figures.utilization_over_time(empty["experts"]),
        figures.utilization_at_step(empty["experts"]), figures.utilization_by_task(empty["shares"]),
        figures.load_balance(empty["experts"]), figures.cosine_over_time(empty["conflict"]),
        figures.cosine_heatmap(empty["conflict"], "a ~ b"), figures.conflict_ranking(empty["conflict"]),
        figures.sign_conflict_over_time(empty["conflict"]), figures.purity_distribution(empty["purity"]),
        figures.loss_curves({"r": empty["losses"]}), figures.compare_load_balance({"r": empty["experts"]}),
    ]:
        assert is_no_data(fig), fig.layout.title.text


def test_natural_order_of_expert_labels() -> None:
    assert sorted(["10", "2", "1"], key=natural_key) == ["1", "2", "10"]
    assert sorted(["layer1:0", "layer0:10", "layer0:2"], key=natural_key) == ["layer0:2", "layer0:10", "layer1:0"]
    assert list(figures.expert_colours(["3", "1", "2"])) == ["1", "2", "3"]


def test_figures_module_does_not_import_streamlit() -> None:
    root = Path(figures.__file__).parent
    for source in root.glob("*.py"):
        assert "streamlit" not in source.read_text(), source.name
