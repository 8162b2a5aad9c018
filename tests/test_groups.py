"""Sample groups on a shared gate: per-group share and load against the gates' own outputs, recorded by the test's
own forward hooks (transformers Qwen3-MoE and OLMoE routers, a dense OMoE gate), with [B] and [B, S] labels and
-1 padding; the specialisation against a numpy mutual information; activation checkpointing; the per-expert
lists' schedule; bad labels; the findings; the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from _hf_moe import build
from torch.utils.checkpoint import checkpoint

import gatewatch as gw
from gatewatch import figures
from gatewatch.gating.discovery import resolve
from gatewatch.models import OMoE
from gatewatch.quantities.groups.read import group_findings
from gatewatch.report import build_report
from gatewatch.rules import Thresholds

GROUPS = ["code", "maths", "chat"]
EVERY, STEPS = 2, 4


def np_softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_mutual_information(pairs_g: np.ndarray, pairs_e: np.ndarray, weights: np.ndarray) -> float:
    """I(G;E) / H(G) of weighted (group, expert) pairs, as H(G) + H(E) - H(G, E) over the pairs (numpy)."""
    def entropy(keys: np.ndarray) -> float:
        _, inverse = np.unique(keys, return_inverse=True, axis=0)
        mass = np.bincount(inverse.ravel(), weights=weights)
        p = mass[mass > 0] / mass.sum()
        return float(-(p * np.log(p)).sum())

    hg = entropy(pairs_g[:, None])
    return (hg + entropy(pairs_e[:, None]) - entropy(np.stack([pairs_g, pairs_e], 1))) / hg


def per_token_labels(b: int, s: int, seed: int, per_sequence: bool) -> torch.Tensor:
    """Random groups, with some rows at -1 (padding): ``[B]`` or ``[B, S]``."""
    g = torch.Generator().manual_seed(seed)
    if per_sequence:
        labels = torch.randint(0, len(GROUPS), (b,), generator=g)
        labels[0] = -1
        return labels
    labels = torch.randint(0, len(GROUPS), (b, s), generator=g)
    labels[:, -2:] = -1  # padding at the end of every sequence
    return labels


def train_hf(family: str, log_dir: Path, per_sequence: bool) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """A few steps of a tiny transformers MoE under GateWatch with sample groups; per router, per window, the
    router outputs recorded by the test's own hook: (logits [T, E], chosen experts [T, k], label of each token)."""
    model = build(family)
    routers = resolve(model, None, None)
    model.train()
    watch = gw.GateWatch(model, log_dir=log_dir, every=EVERY, tensorboard=False, sample_groups=GROUPS)
    current: list[list[Any]] = [[] for _ in routers]
    windows: list[list[Any]] = [[] for _ in routers]
    labels_now: dict[str, np.ndarray] = {}
    for i, g in enumerate(routers):
        def grab(_m: Any, _i: Any, out: Any, i: int = i) -> None:
            logits, _, idx = out
            current[i].append((logits.detach().reshape(-1, logits.shape[-1]).numpy().copy(),
                               idx.detach().reshape(-1, idx.shape[-1]).numpy().copy(), labels_now["tokens"]))
        g.module.register_forward_hook(grab)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    b, s = 3, 6
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(step))
        labels = per_token_labels(b, s, step, per_sequence)
        labels_now["tokens"] = (labels[:, None].expand(b, s) if per_sequence else labels).reshape(-1).numpy()
        with watch.grouped(labels):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()
        if step % EVERY == 0:
            for i in range(len(routers)):
                windows[i].append(current[i])
                current[i] = []
    watch.close()
    return windows


def check_routing(run: gw.Run, gate: str, step: int, probs: np.ndarray, labels: np.ndarray,
                  idx: np.ndarray | None) -> None:
    """The run's group rows of ``gate`` at ``step`` against numpy over the recorded rows."""
    rows = run.table("group_routing")
    rows = rows[(rows["gate"] == gate) & (rows["step"] == step)].set_index("group")
    e = probs.shape[1]
    for g, name in enumerate(GROUPS):
        mine = labels == g
        if not mine.any():
            assert name not in rows.index
            continue
        row = rows.loc[name]
        share = probs[mine].mean(0)
        assert row["tokens"] == mine.sum()
        np.testing.assert_allclose(row["share"], share, atol=1e-6)
        assert row["top_expert"] == share.argmax()
        assert row["top_share"] == pytest.approx(share.max(), abs=1e-6)
        assert row["entropy"] == pytest.approx(-(share * np.log(share)).sum(), abs=1e-6)
        if idx is None:
            assert row["load"] is None
        else:
            load = np.bincount(idx[mine].ravel(), minlength=e) / mine.sum()
            np.testing.assert_allclose(row["load"], load, atol=1e-6)
    spec = run.table("group_specialisation")
    spec = spec[(spec["gate"] == gate) & (spec["step"] == step)].iloc[0]
    keep = labels >= 0
    if idx is None:  # dense: every (row, expert) pair weighted by its affinity
        n = keep.sum()
        pairs_g, pairs_e = np.repeat(labels[keep], e), np.tile(np.arange(e), n)
        weights = probs[keep].ravel()
    else:  # router: one pair per chosen expert
        k = idx.shape[1]
        pairs_g, pairs_e, weights = np.repeat(labels[keep], k), idx[keep].ravel(), np.ones(keep.sum() * k)
    assert spec["value"] == pytest.approx(np_mutual_information(pairs_g, pairs_e, weights), abs=1e-6)
    assert spec["tokens"] == keep.sum()


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("per_sequence", [True, False], ids=["labels[B]", "labels[B,S]"])
@pytest.mark.slow
def test_router_groups_match_the_routers_own_outputs(family: str, per_sequence: bool, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    windows = train_hf(family, tmp_path, per_sequence)
    run = gw.load_run(tmp_path)
    gates = resolve(build(family), None, None)
    assert run.meta["sample_groups"] == GROUPS and "groups" in run.meta["quantities"]
    for gate, per_window in zip(gates, windows, strict=True):
        for w, outs in enumerate(per_window):
            logits = np.concatenate([o[0] for o in outs]).astype(float)
            idx = np.concatenate([o[1] for o in outs])
            labels = np.concatenate([o[2] for o in outs])
            assert (labels == -1).any()  # padding is there, and left out
            check_routing(run, gate.name, (w + 1) * EVERY, np_softmax(logits), labels, idx)
    # the router's own statistics keep every token, padding included
    routers = run.table("routers")
    assert (routers["tokens"] == 3 * 6 * EVERY).all()


def omoe_run(log_dir: Path, labels_of: Any, *, steps: int = STEPS, checkpointed: bool = False,
             temperature: float = 1.0, rows: int = 12, **kw: Any) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """A few steps of OMoE (one dense gate shared by two tasks) with sample groups ``labels_of(step, x, model)``;
    per window, the gate's outputs and labels recorded by the test's own hook."""
    torch.manual_seed(0)
    model = OMoE(in_dim=6, tasks=["a", "b"], n_experts=4, gate_temperature=temperature)
    watch = gw.GateWatch(model, tasks=["a", "b"], log_dir=log_dir, every=EVERY, tensorboard=False,
                         sample_groups=GROUPS, **kw)
    current: list[tuple[np.ndarray, np.ndarray]] = []
    windows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    now: dict[str, np.ndarray] = {}
    calls = {"n": 0}

    def grab(m: Any, _i: Any, out: torch.Tensor) -> None:
        calls["n"] += m.training
        if m.training and torch._C._current_graph_task_id() == -1:  # not the recomputation
            current.append((out.detach().numpy().copy(), now["labels"]))
    model.gate.register_forward_hook(grab)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        x = torch.randn(rows, 6, generator=torch.Generator().manual_seed(step))
        labels = labels_of(step, x, model)
        now["labels"] = labels.numpy()
        with watch.grouped(labels):
            # under activation checkpointing the whole forward runs again inside the backward
            out = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
        watch.backward({"a": out[0].pow(2).mean(), "b": out[1].pow(2).mean()})
        opt.step()
        opt.zero_grad()
        watch.step()
        if step % EVERY == 0:
            windows.append(current)
            current = []
    watch.close()
    if checkpointed:
        assert calls["n"] == 2 * steps  # the gate did run twice per step
    return windows


def random_labels(step: int, x: torch.Tensor, model: OMoE) -> torch.Tensor:
    labels = torch.randint(0, len(GROUPS), (len(x),), generator=torch.Generator().manual_seed(100 + step))
    labels[:2] = -1
    return labels


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "activation-checkpointing"])
def test_dense_shared_gate_groups_match_its_outputs(checkpointed: bool, tmp_path: Path) -> None:
    windows = omoe_run(tmp_path, random_labels, checkpointed=checkpointed)
    run = gw.load_run(tmp_path)
    assert len(windows) == STEPS // EVERY
    for w, outs in enumerate(windows):
        probs = np.concatenate([o[0] for o in outs]).astype(float)
        labels = np.concatenate([o[1] for o in outs])
        check_routing(run, "shared", (w + 1) * EVERY, probs, labels, None)


def test_specialisation_is_one_when_the_expert_reveals_the_group_and_baseline_stays_low(tmp_path: Path) -> None:
    """Labels read off a sharp gate's own choice (expert % 3): I(G;E)/H(G) near 1 and the baseline (labels unrelated
    to the routing) near 0; random labels sit near their baseline."""
    def told(step: int, x: torch.Tensor, model: OMoE) -> torch.Tensor:
        model.eval()  # a look at the gate that neither the watch nor the test's hook counts
        with torch.no_grad():
            labels = model.gate(x).argmax(-1) % len(GROUPS)
        model.train()
        return labels

    omoe_run(tmp_path / "told", told, steps=8, temperature=0.005, rows=200)
    spec = gw.load_run(tmp_path / "told").table("group_specialisation")
    assert (spec["value"] > 0.9).all() and (spec["baseline"] < 0.05).all()
    omoe_run(tmp_path / "random", random_labels, steps=8, temperature=0.005, rows=200)
    rand = gw.load_run(tmp_path / "random").table("group_specialisation")
    assert (rand["value"] - rand["baseline"]).abs().max() < 0.03 and (rand["value"] < 0.05).all()


def test_training_random_numbers_are_untouched(tmp_path: Path) -> None:
    """The uninformative labels come from the watch's own generator: training draws the same numbers."""
    def after(groups: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = OMoE(in_dim=6, tasks=["a", "b"], n_experts=4)
        watch = gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / str(groups), every=EVERY,
                             tensorboard=False, **({"sample_groups": GROUPS} if groups else {}))
        for _ in range(3):
            x = torch.randn(8, 6)
            if groups:
                with watch.grouped(torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))):
                    model(x)
            else:
                model(x)
            watch.step()
        watch.close()
        return torch.rand(4)

    torch.testing.assert_close(after(True), after(False))


def test_per_expert_lists_every_n_windows_and_in_the_last(tmp_path: Path) -> None:
    omoe_run(tmp_path, random_labels, steps=10, group_experts_every=2)  # windows at 2, 4, 6, 8, 10 -> 2, 6, 10
    routing = gw.load_run(tmp_path).table("group_routing")
    detail = sorted(routing.loc[routing["share"].notna(), "step"].unique())
    assert detail == [2, 6, 10]
    assert sorted(routing["step"].unique()) == [2, 4, 6, 8, 10]  # the scalar columns every window
    assert figures.group_detail_steps(routing) == [2, 6, 10]


def test_bad_labels_and_arguments_fail_with_the_fix(tmp_path: Path) -> None:
    model = OMoE(in_dim=6, tasks=["a", "b"], n_experts=4)
    for bad, error, words in ((["a", "a"], ValueError, "distinct"), ("code", TypeError, "list of group names"),
                              ([1, 2], TypeError, "list of group names"), ([], ValueError, "at least one")):
        with pytest.raises(error, match=words):
            gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / "x", sample_groups=bad)
    with pytest.raises(ValueError, match="group_experts_every"):
        gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / "y", sample_groups=GROUPS, group_experts_every=0)
    plain = gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / "plain", tensorboard=False)
    with pytest.raises(TypeError, match="sample_groups"):
        plain.grouped(torch.zeros(4, dtype=torch.long))
    plain.close()
    watch = gw.GateWatch(model, tasks=["a", "b"], log_dir=tmp_path / "z", tensorboard=False, sample_groups=GROUPS)
    with pytest.raises(TypeError, match="integer tensor"):
        watch.grouped(torch.zeros(4))
    with pytest.raises(ValueError, match=r"got \[3\]"):
        watch.grouped(torch.tensor([0, 3]))
    with (pytest.raises(ValueError, match=r"labels of shape \(5,\) do not match gate 'shared', whose output has 8"),
          watch.grouped(torch.zeros(5, dtype=torch.long))):
        model(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"), watch.grouped(torch.zeros(2, 3, dtype=torch.long)):
        model(torch.randn(8, 6))
    watch.close()


def test_findings_polarization_and_overlap(tmp_path: Path) -> None:
    """A group leaning on one expert fires group_polarization; random labels over the recent windows fire
    groups_overlap; labels that follow the routing fire neither."""
    th = Thresholds()

    class Run:
        def __init__(self, routing: pd.DataFrame, spec: pd.DataFrame) -> None:
            self.tables = {"group_routing": routing, "group_specialisation": spec}

        def table(self, name: str) -> pd.DataFrame:
            return self.tables[name]

    steps = np.arange(1, 13) * 10
    routing = pd.DataFrame([{"step": s, "gate": "g", "group": grp, "top_share": top, "top_expert": 2}
                            for s in steps for grp, top in (("code", 0.95), ("chat", 0.4))])
    overlap = pd.DataFrame({"step": steps, "gate": "g", "groups": 2, "value": 0.023, "baseline": 0.02})
    found = group_findings(Run(routing, overlap), th)
    assert {f.code for f in found} == {"group_polarization", "groups_overlap"}
    polar = next(f for f in found if f.code == "group_polarization")
    assert "'code' 95% on expert 2" in polar.message and polar.step == 10 and polar.chart == "groups"
    apart = overlap.assign(value=0.3)
    calm = routing.assign(top_share=0.5)
    assert group_findings(Run(calm, apart), th) == []
    one_group = routing[routing["group"] == "code"]
    assert not [f for f in group_findings(Run(one_group, apart), th) if f.code == "group_polarization"]


def test_report_keys_and_figures(tmp_path: Path) -> None:
    omoe_run(tmp_path, random_labels)
    report = build_report(gw.load_run(tmp_path))
    entries = report["group_routing"]
    assert {e["group"] for e in entries} == set(GROUPS)
    assert set(entries[0]) == {"gate", "group", "step", "tokens", "share", "load", "entropy", "top_expert",
                               "top_share"}
    assert all(e["step"] == STEPS and e["load"] is None and len(e["share"]) == 4 for e in entries)
    spec = report["group_specialisation"]
    assert [s["gate"] for s in spec] == ["shared"] and spec[0]["step"] == STEPS and spec[0]["value"] is not None
    run = gw.load_run(tmp_path)
    fig = figures.group_heatmap(run.table("group_routing"), "shared")
    assert fig.data[0].z.shape == (3, 4) and list(fig.data[0].y) == GROUPS
    assert len(figures.specialisation_curves(run.table("group_specialisation")).data) == 2
    empty = figures.group_heatmap(run.table("group_routing").iloc[:0], "shared")
    assert "sample_groups" in empty.layout.annotations[0].text


@pytest.mark.slow
def test_groups_page_draws_the_heatmap_and_specialisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_app import charts, no_exception, open_app, texts

    pytest.importorskip("transformers")
    train_hf("qwen3_moe", tmp_path / "groups-run", per_sequence=True)
    at = open_app(tmp_path, monkeypatch, "groups", run="groups-run")
    no_exception(at)
    assert charts(at) == 4  # specialisation heatmap and lines, share and load heatmaps of the chosen layer
    assert "code, maths, chat" in texts(at)
    omoe_run(tmp_path / "dense-run", random_labels)
    at = open_app(tmp_path, monkeypatch, "groups", run="dense-run")
    no_exception(at)
    assert charts(at) == 2  # one gate: the specialisation lines and its share heatmap (no dispatch)
