"""Co-activation against a brute-force count over every pair of each token's top-k, per router and window."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _hf_moe import COMMON, batch

import gatewatch as gw
from gatewatch.figures.coactivation import conditional_matrix
from gatewatch.gating.discovery import resolve
from gatewatch.report import build_report, render_text
from gatewatch.run_reader import load_run

tf = pytest.importorskip("transformers")

STEPS, EVERY, E = 6, 2, 8


def model_of(family: str, k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**COMMON, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=16,
                                   norm_topk_prob=True)
    else:
        config = tf.DeepseekV3Config(**COMMON, n_routed_experts=E, num_experts_per_tok=k, moe_intermediate_size=16,
                                     n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
                                     kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                     v_head_dim=8)
    model = tf.AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if name.endswith("gate.weight"):
            with torch.no_grad():
                p.normal_(0, 0.5)
    return model.train()


def train(family: str, k: int, log_dir: Path, **options: Any) -> dict[str, list[list[np.ndarray]]]:
    """Train STEPS steps under GateWatch; return each router's chosen experts per window, from a hook of our own."""
    model = model_of(family, k)
    routers = resolve(model, None, None)
    chosen: dict[str, list[list[np.ndarray]]] = {g.name: [[] for _ in range(STEPS // EVERY)] for g in routers}
    window = [0]
    for g in routers:
        def grab(_m: Any, _i: Any, out: Any, name: str = g.name) -> None:
            chosen[name][window[0]].append(out[2].reshape(-1, k).numpy().copy())
        g.module.register_forward_hook(grab)
    watch = gw.GateWatch(model, log_dir=log_dir, every=EVERY, tensorboard=False, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, STEPS + 1):
        window[0] = (step - 1) // EVERY
        model(**batch(family, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    return chosen


def brute_force(passes: list[np.ndarray]) -> tuple[Counter, Counter, int]:
    """Pair counts over every unordered pair of each token's top-k, each expert's count, and the tokens."""
    pairs: Counter = Counter()
    single: Counter = Counter()
    tokens = 0
    for idx in passes:
        for row in idx:
            tokens += 1
            single.update(int(x) for x in row)
            for a, b in itertools.combinations(sorted(int(x) for x in row), 2):
                pairs[(a, b)] += 1
    return pairs, single, tokens


@pytest.mark.parametrize(("family", "k"), [("qwen3_moe", 4), ("deepseek_v3", 3)])
@pytest.mark.slow
def test_counts_equal_a_brute_force_count_over_every_pair(tmp_path: Path, family: str, k: int) -> None:
    chosen = train(family, k, tmp_path / "run", coactivation_full_every=1)
    run = load_run(tmp_path / "run")
    full, top = run.table("coactivation"), run.table("coactivation_top")
    steps = sorted(full["step"].unique())
    assert steps == [EVERY * (w + 1) for w in range(STEPS // EVERY)]
    for gate, windows in chosen.items():
        for w, passes in enumerate(windows):
            pairs, single, tokens = brute_force(passes)
            rows = full[(full["gate"] == gate) & (full["step"] == steps[w])]
            got = {(int(a), int(b)): int(c) for a, b, c in rows[["expert_a", "expert_b", "count"]].itertuples(
                index=False)}
            want = {**{(e, e): c for e, c in single.items()}, **pairs}
            assert got == want
            p = conditional_matrix(full, gate, steps[w], E)  # P(j | i) against the brute-force count
            for (a, b), c in pairs.items():
                assert p[a, b] == pytest.approx(c / single[a]) and p[b, a] == pytest.approx(c / single[b])
            best = top[(top["gate"] == gate) & (top["step"] == steps[w])].sort_values("rank")
            assert best["count"].tolist() == sorted(pairs.values(), reverse=True)[:len(best)]
            for r in best.itertuples(index=False):
                assert r.count == pairs[(r.expert_a, r.expert_b)]
                assert r.share == pytest.approx(r.count / tokens)
                assert r.p_b_given_a == pytest.approx(r.count / single[r.expert_a])
                assert r.p_a_given_b == pytest.approx(r.count / single[r.expert_b])


def test_the_full_matrix_is_kept_in_the_first_every_nth_and_last_window(tmp_path: Path) -> None:
    train("qwen3_moe", 2, tmp_path / "run", coactivation_full_every=2, coactivation_top=3)
    run = load_run(tmp_path / "run")
    assert sorted(run.table("coactivation")["step"].unique()) == [2, 6]  # windows 0 and 2 (also the last)
    top = run.table("coactivation_top")
    assert sorted(top["step"].unique()) == [2, 4, 6]
    assert top.groupby(["gate", "step"]).size().max() == 3
    report = build_report(run)
    assert [s["gate"] for s in report["coactivation"]] == run.gate_names
    assert all(s["baseline"] == pytest.approx(1 / 7) and len(s["pairs"]) == 3 for s in report["coactivation"])
    assert "co-activation (2 layers, last window)" in render_text(report)


def test_off_and_top1_routers_are_said(tmp_path: Path) -> None:
    train("qwen3_moe", 2, tmp_path / "off", coactivation=False)
    assert not len(load_run(tmp_path / "off").table("coactivation_top"))
    train("qwen3_moe", 1, tmp_path / "top1")
    report = build_report(load_run(tmp_path / "top1"))
    why = [s for s in report["skipped"] if s["view"] == "coactivation"]
    assert len(why) == 2 and "one expert per token" in why[0]["reason"]


def test_bad_keywords_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="coactivation_full_every"):
        gw.GateWatch(model_of("qwen3_moe", 2), log_dir=tmp_path / "bad", coactivation_full_every=0,
                     tensorboard=False)
