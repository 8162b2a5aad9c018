"""The example quantity of docs/quantities.md, written out as a package, registered and trained with."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gatewatch as gw
from gatewatch import registry as quantities
from gatewatch.cli import main as cli_main
from gatewatch.models import MMoE

DOC = Path(__file__).resolve().parent.parent / "docs" / "quantities.md"
TASKS = ["a", "b"]


def doc_files() -> dict[str, str]:
    """The doc's python blocks that start with a ``# path/to/file.py`` line, by path."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return {b.split("\n", 1)[0][2:].strip(): b for b in blocks if re.match(r"# [\w/]+\.py\n", b)}


@pytest.fixture
def input_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, text in doc_files().items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        (path.parent / "__init__.py").touch()
        (path.parent.parent / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(quantities, "QUANTITIES", list(quantities.QUANTITIES))
    quantities.register("my_quantities.input_range")
    yield "my_quantities.input_range"
    for module in [m for m in sys.modules if m.startswith("my_quantities")]:
        del sys.modules[module]


def test_the_documented_quantity_is_two_files(input_range: str) -> None:
    assert set(doc_files()) == {"my_quantities/input_range/capture.py", "my_quantities/input_range/read.py"}


def test_the_documented_quantity_logs_reports_and_finds(input_range: str, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = MMoE(in_dim=6, n_experts=3, expert_hidden=(), expert_dim=4, tasks=TASKS)
    batches = [torch.randn(8, 6) * (1 if step <= 4 else 500) for step in range(1, 9)]  # unscaled from step 5
    with gw.GateWatch(model, tasks=TASKS, log_dir=tmp_path / "run", every=2, flush_every=4) as watch:
        for x in batches:
            out = model(x)
            watch.backward({"a": out[0].pow(2).mean(), "b": out[1].pow(2).mean()})
            watch.step()
    table = gw.load_run(tmp_path / "run").table("input_range")
    want = [np.abs(torch.cat(batches[i : i + 2]).numpy().astype(np.float64)) for i in range(0, 8, 2)]
    assert table["step"].tolist() == [2, 4, 6, 8]
    np.testing.assert_allclose(table["mean_abs"], [w.mean() for w in want], rtol=1e-12)
    np.testing.assert_allclose(table["max_abs"], [w.max() for w in want], rtol=1e-12)
    assert cli_main(["report", str(tmp_path / "run"), "--json"]) in (0, 1)
    report = json.loads(capsys.readouterr().out)
    assert report["input_range"]["step"] == 8 and report["input_range"]["max_abs"] == pytest.approx(want[-1].max())
    assert [f["code"] for f in report["findings"]].count("unscaled_inputs") == 1
    cli_main(["report", str(tmp_path / "run")])
    assert f"input range: mean |x| {want[-1].mean():.3f}, max |x| {want[-1].max():.3f}" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    charted = [(e.step, e.value) for e in events.Scalars("input_range/max_abs")]
    assert [s for s, _ in charted] == [2, 4, 6, 8]
    np.testing.assert_allclose([v for _, v in charted], [w.max() for w in want], rtol=1e-6)
    off = gw.GateWatch(model, tasks=TASKS, log_dir=tmp_path / "off", input_range=False)
    assert "input_range" not in [q.name for q in off.quantities]
    off.close()
