"""The text report of 48 router layers x 128 experts stays readable: under 150 lines, none over 300 characters,
with sample groups on or off, while the JSON keeps every figure; `report | head -3` ends without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _wide_routers import WideRouters

import gatewatch as gw
from gatewatch.report import build_report, render_text
from gatewatch.run_reader import load_run

LAYERS, EXPERTS, TOP_K, TOKENS = 48, 128, 8, 256
SPEC = gw.Router("softmax", TOP_K, renormalize=True)
MAX_LINES, MAX_WIDTH = 150, 300


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "wide"
    torch.manual_seed(0)
    model = WideRouters(LAYERS, 16, EXPERTS, SPEC).train()
    gates = {f"backbone.layers.{i}.mlp.gate": gw.Gate(f"layers.{i}", router=SPEC) for i in range(LAYERS)}
    watch = gw.GateWatch(model, gates=gates, log_dir=path, every=10, tensorboard=False, saturation_every=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(30):
        model(torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(step))).backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    return path


def within_limits(text: str) -> None:
    lines = text.splitlines()
    assert len(lines) < MAX_LINES, f"{len(lines)} lines"
    assert max(map(len, lines)) <= MAX_WIDTH, max(lines, key=len)


@pytest.mark.slow
def test_the_text_report_at_48_by_128_stays_within_the_limits(wide_run: Path) -> None:
    report = build_report(load_run(wide_run))
    assert len(report["balance"]) == LAYERS and all(len(b["load"]) == EXPERTS for b in report["balance"])
    dead = [f for f in report["findings"] if f["code"] == "router_dead"]
    assert len(dead) >= 3, "the run needs a finding on many layers"  # the JSON keeps one finding per layer
    text = render_text(report)
    within_limits(text)
    assert "48 router layers: backbone.layers.{0..47}.mlp.gate" in text
    assert f"router_dead in {len(dead)} of 48 layers: " in text
    lo, hi = min(len(b["dead"]) for b in report["balance"] if b["dead"]), max(len(b["dead"]) for b in report["balance"])
    assert (f"{lo}-{hi} of 128 experts dead" if lo != hi else f"{lo} of 128 experts dead") in text
    worst = max(dead, key=lambda f: f["value"])["gate"].split(".")[2]
    assert f"worst layer {worst} " in text
    layer_lines = [line for line in text.splitlines() if "MaxVio" in line and "dead" in line and "top" in line]
    assert len(layer_lines) == LAYERS
    b = report["balance"][7]
    assert f"dead {len(b['dead']):>3}/128" in layer_lines[7] and f"MaxVio {b['max_violation']:.3f}" in layer_lines[7]
    assert "co-activation (48 layers" in text and "routing stability (probe at step" in text


@pytest.mark.slow
def test_with_sample_groups_the_layer_lines_show_specialisation(wide_run: Path) -> None:
    report = build_report(load_run(wide_run))
    report["group_specialisation"] = [{"gate": g["name"], "step": g["step"], "value": i / 100, "baseline": 0.0005,
                                       "groups": 3}
                                      for i, g in enumerate(report["gates"])]
    report["group_routing"] = [{"gate": g["name"], "group": group, "step": g["step"], "tokens": 100.0,
                                "share": [1 / EXPERTS] * EXPERTS, "load": [TOP_K / EXPERTS] * EXPERTS,
                                "entropy": 1.0, "top_expert": "0", "top_share": 0.01}
                               for g in report["gates"] for group in ("code", "maths", "chat")]
    text = render_text(report)
    within_limits(text)
    layer_lines = [line for line in text.splitlines() if "MaxVio" in line and "dead" in line]
    assert len(layer_lines) == LAYERS and "specialisation 0.120" in layer_lines[12]


@pytest.mark.slow
def test_report_of_the_wide_run_into_a_closed_pipe(wide_run: Path) -> None:
    command = f"'{sys.executable}' -m gatewatch.cli report '{wide_run}' | head -3; exit ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert len(done.stdout.splitlines()) == 3
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr
