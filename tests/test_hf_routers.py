"""Zero-config sparse routers on tiny transformers MoE models (built from configs, CPU).

Every figure of the ``routers`` quantity and the affinity of the ``gates`` quantity is checked against plain
numpy on the router outputs captured by a separate hook: the dispatch load from the router's own indices or
mask, MaxVio, dead experts, the boundary margin in the router's choice space, dropped tokens, the expert
bias and the share of tokens whose choice the bias changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from _hf_moe import FAMILIES, batch, build

import gatewatch as gw
from gatewatch.gating.discovery import resolve
from gatewatch.gating.router_table import choose
from gatewatch.run_reader import load_run

pytest.importorskip("transformers")

STEPS, EVERY, MARGIN = 4, 2, 0.05


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def np_softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_choice_space(module: Any, scoring: str, logits: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The scores a router ranks, written from its forward: DeepSeek-style group limit included."""
    if scoring == "softmax":
        return np_softmax(logits)
    if scoring == "softmax_topk":
        return logits
    s = np_sigmoid(logits) + (0 if bias is None else bias)
    g, kg = module.num_group, module.topk_group
    t, e = s.shape
    grouped = s.reshape(t, g, e // g)
    group_score = np.sort(grouped, -1)[..., -2:].sum(-1)
    allowed = np.argsort(-group_score, -1)[:, :kg]
    keep = np.zeros((t, g), bool)
    np.put_along_axis(keep, allowed, True, 1)
    return np.where(np.repeat(keep, e // g, 1), s, -np.inf)


def train(family: str, log_dir: Path, *, bias: bool = False, update: float = 0.0, steps: int = STEPS,
          favour: int | None = None) -> tuple[torch.nn.Module, list[dict[str, list[Any]]]]:
    """Train a few steps under a zero-config GateWatch; return each router's outputs per window."""
    model = build(family)
    routers = resolve(model, None, None)
    if favour is not None:
        _favour(model, family, [g.module for g in routers], favour)
    if bias:
        for g in routers:
            with torch.no_grad():
                g.module.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, g.module.num_experts))
    model.train()
    watch = gw.GateWatch(model, log_dir=log_dir, every=EVERY, tensorboard=False, margin=MARGIN)
    captured: list[dict[str, list[Any]]] = [{"windows": [], "bias": []} for _ in routers]
    current: list[list[Any]] = [[] for _ in routers]
    for i, g in enumerate(routers):
        def grab(m: Any, _i: Any, out: Any, i: int = i) -> None:  # the output, and the bias it was chosen with
            b = getattr(m, "e_score_correction_bias", None)
            current[i].append((*(o.detach().clone() for o in out), None if b is None else b.clone().numpy()))
        g.module.register_forward_hook(grab)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, steps + 1):
        loss = model(**batch(family, seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if update:  # DeepSeek-V3's aux-loss-free update: b += u * sign(mean load - load)
            for i, g in enumerate(routers):
                idx = current[i][-1][2].reshape(-1)
                load = torch.bincount(idx, minlength=g.module.num_experts).float()
                g.module.e_score_correction_bias += update * torch.sign(load.mean() - load)
        watch.step()
        if step % EVERY == 0:
            for i, g in enumerate(routers):
                captured[i]["windows"].append(current[i])
                b = getattr(g.module, "e_score_correction_bias", None)
                captured[i]["bias"].append(None if b is None else b.detach().clone().numpy())
                current[i] = []
    watch.close()
    return model, captured


def _favour(model: torch.nn.Module, family: str, modules: list[Any], expert: int) -> None:
    """Point each router's rows ``expert`` and ``expert + 1`` (one group) along its mean input, so most tokens
    choose those two."""
    means: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, inp: means.append(inp[0].reshape(-1, inp[0].shape[-1])
                                                                          .mean(0))) for m in modules]
    with torch.no_grad():
        model(**batch(family, seed=0))
        for m, mu in zip(modules, means, strict=True):
            m.weight[expert:expert + 2] = 8 * mu / mu.norm()
    for h in handles:
        h.remove()


def reference(module: Any, router: Any, outs: list[Any], bias: np.ndarray | None) -> dict[str, Any]:
    """Numpy figures of one router over one window of its outputs."""
    e = router_experts(outs)
    k = router.top_k
    if router.mask is not None:
        mask = np.concatenate([o[0].reshape(-1, e).numpy() for o in outs]).astype(float)
        logits = np.concatenate([o[2].reshape(-1, e).numpy() for o in outs]).astype(float)
        counts = mask.sum(0)
        chose = np.bincount(logits.argmax(-1), minlength=e).astype(float)
        changed = np.nan
    else:
        logits = np.concatenate([o[0].reshape(-1, e).float().numpy() for o in outs]).astype(float)
        idx = np.concatenate([o[2].reshape(-1, k).numpy() for o in outs])
        counts = np.bincount(idx.ravel(), minlength=e).astype(float)
        chose = counts
        changed = np.nan
        if bias is not None:
            plain = np.argsort(-np_choice_space(module, router.scoring, logits, None), -1, kind="stable")[:, :k]
            a, b = np.zeros((len(idx), e), bool), np.zeros((len(idx), e), bool)
            np.put_along_axis(a, idx, True, 1)
            np.put_along_axis(b, plain, True, 1)
            changed = (a != b).any(1).mean()
    t = len(logits)
    load = counts / t
    biases = [o[3] for o in outs for _ in range(o[0].reshape(-1, e).shape[0])] if bias is not None else None
    space = np_choice_space(module, router.scoring, logits, None if biases is None else np.stack(biases))
    space = np.sort(space, -1)[:, ::-1]
    gap = space[:, k - 1] - space[:, k]
    ok = np.isfinite(gap)
    affinity = np_sigmoid(logits) / np_sigmoid(logits).sum(-1, keepdims=True) if router.scoring == "sigmoid" \
        else np_softmax(logits)
    return {"tokens": t, "load": load, "max_violation": load.max() / load.mean() - 1, "dead": int((counts == 0).sum()),
            "margin": gap[ok].mean(), "small_margin": (gap[ok] < MARGIN).mean(), "bias_changed": changed,
            "dropped": (1 - counts.sum() / chose.sum()) if router.mask is not None else np.nan,
            "share": affinity.mean(0)}


def router_experts(outs: list[Any]) -> int:
    return int(outs[0][2].shape[-1] if outs[0][0].dim() == 3 else outs[0][0].shape[-1])


def check_family(family: str, tmp_path: Path, **kw: Any) -> tuple[Any, list[Any]]:
    model, captured = train(family, tmp_path, **kw)
    run = load_run(tmp_path)
    watch_gates = resolve(model, None, None)
    routers, experts, shares = run.table("routers"), run.table("router_experts"), run.table("shares")
    assert len(watch_gates) == len(captured) >= 1
    for g, cap in zip(watch_gates, captured, strict=True):
        mine = routers[routers["gate"] == g.path].sort_values("step")
        assert len(mine) == STEPS // EVERY
        for w, (outs, bias) in enumerate(zip(cap["windows"], cap["bias"], strict=True)):
            ref = reference(g.module, g.router, outs, None if g.router.bias is None else bias)
            row = mine.iloc[w]
            ex = experts[(experts["gate"] == g.path) & (experts["step"] == row["step"])].sort_values("expert")
            np.testing.assert_allclose(ex["load"], ref["load"], atol=1e-12)
            for key in ("tokens", "max_violation", "dead", "margin", "small_margin", "bias_changed", "dropped"):
                np.testing.assert_allclose(row[key], ref[key], atol=1e-5, err_msg=f"{family} {key}")
            sh = shares[(shares["gate"] == g.path) & (shares["step"] == row["step"])].sort_values("expert")
            np.testing.assert_allclose(sh["share"], ref["share"], atol=1e-5)
            if g.router.bias is not None:
                np.testing.assert_allclose(ex["bias"], bias, atol=1e-7)
    return run, captured


def test_deepseek_bias_changes_dispatch_and_every_figure_matches_numpy(tmp_path: Path) -> None:
    run, captured = check_family("deepseek_v3", tmp_path, bias=True, update=1e-3)
    row = run.table("routers").iloc[-1]
    assert row["bias_changed"] > 0  # the dispatch is not the top k of the scores
    first, last = captured[0]["bias"][0], captured[0]["bias"][-1]
    assert not np.allclose(first, last)  # the loop's update shows per window, replicated (not summed)
    report = gw.build_report(run)
    entry = next(b for b in report["balance"] if b["gate"] == row["gate"])
    assert entry["bias"] == pytest.approx(list(last)) and entry["bias_changed"] == pytest.approx(row["bias_changed"])
    assert entry["dropped"] is None and sum(entry["load"]) == pytest.approx(2.0)


def test_switch_capacity_dropped_and_mask_load(tmp_path: Path) -> None:
    run, _ = check_family("switch", tmp_path)
    routers = run.table("routers")
    assert (routers["dropped"] > 0).any()  # capacity 4 per sequence of 12 tokens drops some
    entry = gw.build_report(run)["balance"][0]
    assert entry["dropped"] is not None and entry["bias"] is None and entry["top_k"] == 1
    from gatewatch import figures

    experts = run.table("router_experts")
    dropped = figures.load_heatmap(experts, value="dropped")
    last = experts[experts["step"] == experts["step"].max()]
    assert np.nansum(np.asarray(dropped.data[0].z, dtype=float)) == pytest.approx(last["dropped"].sum())
    assert len(figures.router_curves(routers, "dropped").data) == routers["gate"].nunique()


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("deepseek_v3", "switch")])
def test_every_family_found_with_no_arguments_and_matches_numpy(family: str, tmp_path: Path) -> None:
    run, _ = check_family(family, tmp_path)
    assert run.table("experts").empty  # routers' experts are per layer, not averaged across layers


def test_imbalance_and_growing_bias_findings(tmp_path: Path) -> None:
    _, _ = train("glm4_moe", tmp_path, update=1e-3, steps=8, favour=0)
    codes = {f["code"] for f in gw.build_report(load_run(tmp_path))["findings"]}
    assert {"router_imbalance", "router_bias_growing"} <= codes


def test_discovery_never_suggests_mlp_gate_proj_or_shared_expert_gate() -> None:
    model = build("qwen2_moe")
    from gatewatch.gating.discovery import _near_misses
    misses = _near_misses(model)
    assert not any(p.endswith(("gate_proj", "shared_expert_gate")) for p in misses)
    gates = resolve(model, None, None)
    assert [g.path for g in gates] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "switch"])
def test_knock_out_recomputes_the_choice(family: str) -> None:
    model = build(family)
    model.train()
    gates = resolve(model, None, None)
    seen: list[Any] = []
    with gw.masking.knock_out(model, {gates[-1].name: [0, 1]}):  # its hook runs first: we see the new output
        handle = gates[-1].module.register_forward_hook(lambda _m, _i, out: seen.append(out))
        model(**batch(family))
    handle.remove()
    out = seen[-1]
    if gates[-1].router.mask is not None:
        mask = out[0].reshape(-1, out[0].shape[-1])
        assert mask[:, :2].sum() == 0 and mask.sum() > 0
        return
    idx = out[2]
    assert not torch.isin(idx, torch.tensor([0, 1])).any()
    logits = out[0].float()
    ref = choose(gates[-1].router, gates[-1].module, logits)
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ref, -1).values)


def test_gate_dropout_on_a_zero_config_sigmoid_router_rechooses_from_the_kept_experts() -> None:
    model = build("glm4_moe")
    model.train()
    gate = resolve(model, None, None)[-1]
    seen: list[Any] = []
    with gw.masking.gate_dropout(model, 0.5, seed=1):
        handle = gate.module.register_forward_hook(lambda _m, _i, out: seen.append(out))
        model(**batch("glm4_moe"))
    handle.remove()
    logits, weights, idx = seen[-1]
    dropped = torch.isneginf(logits)
    enough = (~dropped).sum(-1) >= 2  # tokens that kept at least k experts
    assert dropped[enough].any()  # some experts were dropped for those tokens ...
    assert not dropped.gather(1, idx)[enough].any()  # ... and never chosen: the choice was made again without them
    ref = choose(gate.router, gate.module, logits)
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ref, -1).values)
    np.testing.assert_allclose(weights.sum(-1).detach().numpy(), 2.5, rtol=1e-5)  # renormalised x scaling factor


def test_tensorboard_scalars_stay_bounded_for_many_layers_and_experts() -> None:
    """48 layers x 128 experts: per-layer summaries, percentiles across layers and top/bottom 3, no per-expert tag;
    the values match numpy."""
    from gatewatch.quantities.routers.read import router_tables
    from gatewatch.sinks.scalars import scalars

    rng = np.random.default_rng(0)
    layers, e, k = 48, 128, 8
    routers, experts, shares = [], [], []
    for layer in range(layers):
        counts = rng.multinomial(4096 * k, rng.dirichlet(np.ones(e)))
        sums = np.concatenate([[4096], counts, counts, counts * 0.1, [0.0, 0.0, 0.0, 0.0]])[None]
        t = router_tables(f"l{layer}", k, False, np.array([10]), sums, None, [str(i) for i in range(e)])
        routers.append(t["routers"])
        experts.append(t["router_experts"])
        shares.append(pd.DataFrame({"step": 10, "gate": f"l{layer}", "expert": np.arange(e),
                                    "expert_name": [str(i) for i in range(e)], "share": 1 / e}))
    tables = {"routers": pd.concat(routers), "router_experts": pd.concat(experts), "shares": pd.concat(shares)}
    tags = {tag: value for tag, value, _ in scalars(tables)}
    assert len(tags) < 1000 and not any("/share/" in t for t in tags)
    assert not any(t.split("/")[-1].isdigit() for t in tags)
    maxvio = tables["routers"]["max_violation"].to_numpy()
    assert tags["routers/max_violation/p90"] == pytest.approx(np.percentile(maxvio, 90))
    load = tables["router_experts"].query("gate == 'l0'")["load"].to_numpy()
    assert tags["router/l0/load/top1"] == pytest.approx(load.max())
    assert tags["router/l0/load/bottom1"] == pytest.approx(load.min())
    assert tags["router/l0/max_violation"] == pytest.approx(load.max() / load.mean() - 1)
    small = {name: df[df["gate"].isin(["l0", "l1"])] for name, df in tables.items()}  # 2 x 128 = 256: kept
    assert any(t == "router/l0/load/5" for t, _, _ in scalars(small))


SAMPLE = Path(__file__).resolve().parents[1] / "sample_runs" / "deepseek-routers"


def test_routers_figures_draw_the_dispatch_tables() -> None:
    from gatewatch import figures

    run = load_run(SAMPLE)
    experts, routers = run.table("router_experts"), run.table("routers")
    last = experts[experts["step"] == experts["step"].max()]
    fig = figures.load_heatmap(experts)
    want = last.pivot(index="gate", columns="expert", values="load").to_numpy()
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), want)
    assert list(fig.data[0].y) == ["1", "2", "3"]  # layer labels without the shared path
    maxvio = figures.max_violation_heatmap(routers)
    assert np.asarray(maxvio.data[0].z).shape == (3, routers["step"].nunique())
    assert len(figures.router_curves(routers).data) == 3
    skewed = routers[routers["gate"].str.endswith("layers.3.mlp.gate")].sort_values("step")
    assert skewed["max_violation"].tail(10).median() > 1  # the skewed layer stays imbalanced
    assert figures.router_summary(routers)["max_violation"].iloc[-1] == pytest.approx(skewed["max_violation"].iloc[-1])
    assert "no sparse router" in str(figures.load_heatmap(experts.iloc[:0]).layout.annotations[0].text)


@pytest.mark.slow
def test_routers_page_and_findings_on_the_sample_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_app import charts, no_exception, open_app, texts

    at = open_app(SAMPLE.parent, monkeypatch, "routers", run=SAMPLE.name)
    no_exception(at)
    # load + MaxVio heatmaps, MaxVio lines, bias heatmap, bias-changed lines; co-activation P(j|i), routing
    # stability heatmap and the saturation curve (the sample run probes its routing)
    assert charts(at) == 8
    overview = open_app(SAMPLE.parent, monkeypatch, "overview", run=SAMPLE.name)
    assert "router imbalance" in texts(overview)
    links = [link.proto for link in overview.get("page_link")]
    assert any(link.page == "routers" and link.label == "Show on the Routers page" for link in links)


class BigRouter(torch.nn.Module):
    """A custom DeepSeek-style router (sigmoid, bias, 8 groups of 16, top 8 in 4 groups) stated with gw.Router."""

    def __init__(self, d: int = 32, e: int = 128) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d, e, bias=False)
        self.register_buffer("bias", torch.linspace(-0.2, 0.2, e))
        self.spec = gw.Router("sigmoid", 8, bias="bias", groups=(8, 4), renormalize=True)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(h)
        idx = self.spec.choose(self, logits.detach())
        return logits, self.spec.weights_of(logits, idx), idx


@pytest.mark.slow
def test_custom_router_at_32k_tokens_x_128_experts_holds_bounded_state(tmp_path: Path) -> None:
    """A custom router stated with gw.Router: its load is its own dispatch (numpy), and what the watch holds
    between flushes stays one small vector per window (dispatch) and at most HOLD_ELEMENTS (affinity, and the
    router outputs waiting for the dispatch sums)."""
    from gatewatch.quantities.gates.capture import HOLD_ELEMENTS
    from gatewatch.quantities.routers.capture import HOLD_ELEMENTS as ROUTER_HOLD

    torch.manual_seed(0)
    model = BigRouter().train()
    watch = gw.GateWatch(model, gates={"router": gw.Gate(model, router=model.spec)}, log_dir=tmp_path, every=2,
                         tensorboard=False, flush_every=1000, flush_secs=None)
    gates_q = next(q for q in watch.quantities if q.name == "gates")
    routers_q = next(q for q in watch.quantities if q.name == "routers")
    counts = np.zeros(128)
    for step in range(4):
        h = torch.randn(32_768, 32)
        _, _, idx = model(h)
        if step >= 2:
            counts += np.bincount(idx.reshape(-1).numpy(), minlength=128)
        watch.step()
        assert sum(p.numel() for *_, (_, p) in gates_q.buffer.held) <= HOLD_ELEMENTS
        assert routers_q.buffer.held_elements <= ROUTER_HOLD
        assert all(t.shape[0] <= 3 and t.shape[1] == 3 * 128 + 5 for t in routers_q.buffer.sums.values())
    watch.close()
    load = load_run(tmp_path).table("router_experts").query("step == 4")["load"].to_numpy()
    np.testing.assert_allclose(load, counts / 65_536)
    assert load.sum() == pytest.approx(8.0)
