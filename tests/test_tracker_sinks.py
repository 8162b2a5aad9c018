"""Tracker sinks with the real packages, offline: MLflow into a sqlite store, W&B in offline mode; the scalars
shared with TensorBoard; the framework callbacks passing ``sinks=`` through."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

import gatewatch as gw
from gatewatch.models import MMoE
from gatewatch.sinks import Sink
from gatewatch.sinks.scalars import scalars
from gatewatch.sinks.tensorboard import TensorBoardSink

TASKS = ["a", "b"]
STEPS, EVERY, FLUSH_EVERY = 24, 2, 4
WINDOWS = list(range(EVERY, STEPS + 1, EVERY))


def need(*modules: str) -> list[ModuleType]:
    """Import the tracker's packages; skip when one is missing, except under CI (where ``dev`` installs them)."""
    found = []
    for name in modules:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"{name} is not installed: pip install -e '.[dev]' (these tests always run under CI)")
    return found


def train(log_dir: Path, sinks: list[Sink], *, steps: int = STEPS) -> gw.GateWatch:
    """A tiny MMoE whose gate 'a' always picks expert 0 (so there are findings), with gradient conflict
    measured every 4 steps and one evaluation; flushes every ``FLUSH_EVERY`` steps exactly."""
    torch.manual_seed(0)
    model = MMoE(in_dim=8, n_experts=3, expert_hidden=(), expert_dim=4, tasks=TASKS)
    linear = model.gates["a"][0]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
    linear.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    bce = nn.functional.binary_cross_entropy_with_logits
    g = torch.Generator().manual_seed(0)
    with gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, every=EVERY, flush_every=FLUSH_EVERY, flush_secs=None,
                      tensorboard=False, sinks=sinks, conflict_every=4) as watch:
        for step in range(1, steps + 1):
            x = torch.randn(32, 8, generator=g)
            y = (x[:, 0] > 0).float()
            watch.backward({t: bce(p, y if t == "a" else 1 - y) for t, p in zip(TASKS, model(x), strict=True)})
            opt.step()
            opt.zero_grad()
            watch.step()
            if step == 6:
                watch.log_metrics(step, {"a": {"auc": 0.75}, "b": {"auc": 0.5}})
    return watch


def gate_values(run: gw.Run, gate: str, metric: str) -> list[tuple[int, float]]:
    rows = run.gates[run.gates["gate"] == gate].sort_values("step")
    return [(int(s), float(v)) for s, v in zip(rows["step"], rows[metric], strict=True)]


# ---------------------------------------------------------------------------------------------- shared scalars
@pytest.mark.slow
def test_the_sinks_package_imports_no_tracker_and_no_torch() -> None:
    code = ("import sys, gatewatch.sinks as s\n"
            "assert not {'torch', 'mlflow', 'wandb'} & set(sys.modules), sorted(sys.modules)\n"
            "assert s.MLflowSink.__name__ == 'MLflowSink' and s.WandbSink.__name__ == 'WandbSink'\n"
            "assert not {'torch', 'mlflow', 'wandb'} & set(sys.modules)  # the classes import them on use\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tensorboard_writes_the_shared_scalars(tmp_path: Path) -> None:
    """TensorBoard and the trackers chart the same scalars: those of ``scalars(tables)``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Tables(Sink):
        def __init__(self) -> None:
            self.flushes: list[dict[str, pd.DataFrame]] = []

        def write(self, tables: dict[str, pd.DataFrame]) -> bool:
            self.flushes.append(tables)
            return True

    kept = Tables()
    watch = train(tmp_path / "run", [kept], steps=8)
    assert watch.closed
    want = {(tag, step): value for t in kept.flushes for tag, value, step in scalars(t)}
    assert {"gate/a/entropy", "expert/0/utilization", "experts/load_cv", "loss/b", "eval/val/a/auc",
            "conflict/a~b/cosine", "conflict/norm/a"} <= {tag for tag, _ in want}
    tb = TensorBoardSink(tmp_path / "tb")  # the same flushes (the run itself has tensorboard=False)
    for t in kept.flushes:
        assert tb.write(t)
    tb.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7) for k in want)


# ---------------------------------------------------------------------------------------------- MLflow
@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    need("mlflow", "sqlalchemy", "alembic")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return f"sqlite:///{tmp_path}/mlflow.db"


def only_run(client: Any, experiment: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_mlflow_sink_logs_every_window_findings_and_report(tmp_path: Path, mlflow_store: str) -> None:
    from mlflow import MlflowClient

    from gatewatch.sinks import MLflowSink

    sink = MLflowSink(tracking_uri=mlflow_store, experiment="t")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no tracker failure
        train(tmp_path / "run", [sink])
    run = gw.load_run(tmp_path / "run")
    assert run.status == "finished" and sorted(set(run.gates["step"])) == WINDOWS

    client = MlflowClient(tracking_uri=mlflow_store)
    logged = only_run(client, "t")
    assert logged.info.run_id == sink.run_id and logged.info.status == "FINISHED"  # the sink created and ended it
    assert logged.info.run_name == "run"
    for gate in TASKS:
        for metric in ("entropy", "top_share"):
            history = client.get_metric_history(sink.run_id, f"gatewatch/gate/{gate}/{metric}")
            got = sorted((m.step, m.value) for m in history)
            want = gate_values(run, gate, metric)
            assert [s for s, _ in got] == WINDOWS  # one value per window, at its step
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-9)
    losses = client.get_metric_history(sink.run_id, "gatewatch/loss/b")
    assert sorted(m.step for m in losses) == WINDOWS
    conflict = client.get_metric_history(sink.run_id, "gatewatch/conflict/a-vs-b/cosine")  # "~" is not allowed
    assert sorted(m.step for m in conflict) == sorted(set(run.table("conflict")["step"]))
    assert [m.value for m in client.get_metric_history(sink.run_id, "gatewatch/eval/val/a/auc")] == [0.75]

    tags = logged.data.tags
    findings = json.loads(Path(client.download_artifacts(sink.run_id, "gatewatch/findings.json", str(tmp_path)))
                          .read_text())
    assert findings["step"] in range(FLUSH_EVERY, STEPS + 1, FLUSH_EVERY) and findings["findings"]
    codes = {f["code"] for f in findings["findings"]}
    assert {k.removeprefix("gatewatch.finding.") for k in tags if k.startswith("gatewatch.finding.")} == codes
    assert all(len(tags[f"gatewatch.finding.{c}"]) <= 250 and "@ step" in tags[f"gatewatch.finding.{c}"]
               for c in codes)
    assert tags["gatewatch.findings"].endswith(f"@ step {STEPS}")
    assert tags["gatewatch.status"] == "finished" and tags["gatewatch.run_dir"].endswith("run")
    report = json.loads(Path(client.download_artifacts(sink.run_id, "gatewatch/report.json", str(tmp_path)))
                        .read_text())
    assert report["run"] == "run" and {g["name"] for g in report["gates"]} == set(TASKS)
    assert {f["code"] for f in report["findings"]} == codes
    assert sink.failures == 0 and sink.pending == []


@pytest.mark.slow
def test_mlflow_sink_joins_the_active_run_and_chunks_batches(tmp_path: Path, mlflow_store: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    from gatewatch.sinks import MLflowSink
    from gatewatch.sinks import mlflow as sink_module

    monkeypatch.setattr(sink_module, "MAX_METRICS_PER_BATCH", 7)
    sizes: list[int] = []
    real = MlflowClient.log_batch

    def log_batch(self: Any, run_id: str, metrics: Any = (), **kwargs: Any) -> Any:
        sizes.append(len(metrics))
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    mlflow.set_tracking_uri(mlflow_store)
    try:
        with mlflow.start_run(experiment_id=mlflow.create_experiment("mine")) as active:
            sink = MLflowSink()
            train(tmp_path / "run", [sink], steps=8)
            assert sink.run_id == active.info.run_id and not sink.owned
            assert MlflowClient().get_run(active.info.run_id).info.status == "RUNNING"  # left to its owner
    finally:
        mlflow.set_tracking_uri(None)
    assert max(sizes) == 7 and sizes.count(7) >= 3  # several full chunks of at most 7 metrics
    history = MlflowClient(tracking_uri=mlflow_store).get_metric_history(active.info.run_id, "gatewatch/gate/b/entropy")
    assert sorted(m.step for m in history) == [2, 4, 6, 8]


@pytest.mark.slow
def test_a_failing_mlflow_never_stops_training(tmp_path: Path, mlflow_store: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """log_batch raises for a while: training goes on, one warning, the run directory is complete, and the
    scalars kept meanwhile reach MLflow once it works again; when it never works, close still returns."""
    from mlflow import MlflowClient

    from gatewatch.sinks import MLflowSink

    real = MlflowClient.log_batch
    broken = {"on": True}

    def log_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if broken["on"]:
            raise ConnectionError("tracking server unreachable")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    sink = MLflowSink(tracking_uri=mlflow_store, experiment="t")
    real_step = gw.GateWatch.step

    def step(watch: gw.GateWatch) -> None:
        real_step(watch)
        if watch.step_count == 12:
            broken["on"] = False  # MLflow is back from the flush of step 16 on

    monkeypatch.setattr(gw.GateWatch, "step", step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tmp_path / "run", [sink])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("could not log scalars in MLflow" in m for m in messages) == 1, messages
    assert sum("logs to MLflow again" in m for m in messages) == 1
    assert sink.failures >= 3 and sink.pending == [] and sink.dropped == 0
    run = gw.load_run(tmp_path / "run")
    assert run.status == "finished" and run.problems == [] and sorted(set(run.gates["step"])) == WINDOWS
    history = MlflowClient(tracking_uri=mlflow_store).get_metric_history(sink.run_id, "gatewatch/gate/a/entropy")
    assert sorted(m.step for m in history) == WINDOWS  # nothing lost: the early windows were sent late

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(MlflowClient, "log_batch", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    down = MLflowSink(tracking_uri=mlflow_store, experiment="t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tmp_path / "run2", [down], steps=8)
    assert any("could not send" in str(w.message) for w in caught)
    assert gw.load_run(tmp_path / "run2").status == "finished" and down.closed


@pytest.mark.slow
def test_mlflow_names_are_valid() -> None:
    need("mlflow")
    from mlflow.utils.validation import _validate_metric_name

    from gatewatch.sinks.mlflow import mlflow_name

    for tag in ("gatewatch/conflict/a~b/cosine", "gatewatch/gate/x/share/é#1", "gatewatch/gate/../share/./x",
                "gatewatch//loss/a"):
        _validate_metric_name(mlflow_name(tag))
    assert mlflow_name("gatewatch/conflict/a~b/cosine") == "gatewatch/conflict/a-vs-b/cosine"


# ---------------------------------------------------------------------------------------------- W&B
@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    (wandb,) = need("wandb")
    for name, value in {"WANDB_DIR": str(tmp_path), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_CONSOLE": "off", "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                        "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_DATA_DIR": str(tmp_path / "data")
                        }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    wandb.teardown()  # W&B keeps the settings of its first setup (WANDB_DIR ...) for the process
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


def record_logs(run: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = run.log

    def log(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(dict(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(run, "log", log)
    return calls


@pytest.mark.slow
def test_wandb_sink_logs_every_window_against_its_own_step(tmp_path: Path, wandb_offline: ModuleType,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = wandb_offline
    from gatewatch.sinks import WandbSink

    active = wandb.init(project="t", mode="offline")
    calls = record_logs(active, monkeypatch)
    defined: list[tuple[Any, ...]] = []
    real_define = active.define_metric

    def define_metric(name: str, *args: Any, **kwargs: Any) -> Any:
        defined.append((name, kwargs.get("step_metric")))
        return real_define(name, *args, **kwargs)

    monkeypatch.setattr(active, "define_metric", define_metric)
    sink = WandbSink()
    train(tmp_path / "run", [sink])
    run = gw.load_run(tmp_path / "run")
    assert sink.run is active and not sink.owned and wandb.run is active  # the active run stays open
    assert defined == [("gatewatch/step", None), ("gatewatch/*", "gatewatch/step")]

    rows = [c for c in calls if "gatewatch/gate/a/entropy" in c]
    assert [c["gatewatch/step"] for c in rows] == WINDOWS  # one row per window, none dropped
    want = dict(gate_values(run, "b", "entropy"))
    assert all(c["gatewatch/gate/b/entropy"] == pytest.approx(want[c["gatewatch/step"]], rel=1e-6) for c in rows)
    assert all("gatewatch/step" in c and all(k.startswith("gatewatch/") for k in c) for c in calls)
    eval_rows = [c for c in calls if "gatewatch/eval/val/a/auc" in c]
    assert [(c["gatewatch/step"], c["gatewatch/eval/val/a/auc"]) for c in eval_rows] == [(6, 0.75)]
    tables = [c for c in calls if "gatewatch/findings" in c]
    assert tables and all(isinstance(c["gatewatch/findings"], wandb.Table) for c in tables)

    summary = active.summary  # read back from the live run before it finishes
    last = run.gates[run.gates["step"] == STEPS].set_index("gate")
    assert summary["gatewatch/step"] == STEPS
    assert summary["gatewatch/gate/a/entropy"] == pytest.approx(float(last.loc["a", "entropy"]), rel=1e-6)
    findings = tables[-1]["gatewatch/findings"]
    codes = {row[0] for row in findings.data}
    keys = dict(summary)
    assert codes and {k.removeprefix("gatewatch/finding/") for k in keys if k.startswith("gatewatch/finding/")} == codes
    assert summary["gatewatch/findings_count"].endswith(f"@ step {STEPS}")
    assert summary["gatewatch/report/status"] == "finished" and summary["gatewatch/report/run"] == "run"
    assert math.isfinite(summary["gatewatch/report/gates/a/entropy"])
    assert summary["gatewatch/report/gates/a/entropy"] == pytest.approx(float(last.loc["a", "entropy"]), rel=1e-6)
    assert sink.failures == 0 and sink.pending == []
    active.finish()
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{active.id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


@pytest.mark.slow
def test_wandb_sink_starts_and_finishes_its_own_run(tmp_path: Path, wandb_offline: ModuleType) -> None:
    wandb = wandb_offline
    from gatewatch.sinks import WandbSink

    sink = WandbSink(project="t", mode="offline")
    assert wandb.run is None and not sink.started  # nothing starts before the watch's first write
    train(tmp_path / "run", [sink], steps=8)
    assert sink.owned and wandb.run is None  # finished at close
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{sink.run.id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert sink.run.name == "run"


@pytest.mark.slow
def test_a_failing_wandb_never_stops_training(tmp_path: Path, wandb_offline: ModuleType,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = wandb_offline
    from gatewatch.sinks import WandbSink

    active = wandb.init(project="t", mode="offline")
    monkeypatch.setattr(active, "log", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("W&B is down")))
    sink = WandbSink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tmp_path / "run", [sink], steps=8)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("could not log scalars in W&B" in m for m in messages) == 1, messages
    run = gw.load_run(tmp_path / "run")
    assert run.status == "finished" and sorted(set(run.gates["step"])) == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="prefix"):
        WandbSink(prefix="")


# ---------------------------------------------------------------------------------------------- callbacks
class Recorder(Sink):
    """Counts what the watch hands a sink."""

    wants_findings = True

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.findings = 0
        self.report: dict[str, Any] | None = None

    def write(self, tables: dict[str, pd.DataFrame]) -> bool:
        if "gates" in tables:
            self.steps += sorted(set(tables["gates"]["step"].tolist()))
        return True

    def log_findings(self, step: int, findings: list[dict[str, Any]]) -> None:
        self.findings += 1

    def close(self, report: dict[str, Any] | None = None) -> None:
        self.report = report


def test_lightning_callback_passes_sinks_through(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is an optional dependency")
    from test_lightning import GateWatchCallback, MultiTask, fit

    sink = Recorder()
    fit(MultiTask(), tmp_path, GateWatchCallback(tasks=["ctr", "like"], every=2, flush_every=4,
                                                 log_dir=tmp_path / "run", sinks=[sink]), max_steps=4)
    assert sink.steps == [2, 4] and sink.findings >= 1 and sink.report is not None
    assert sink.report["status"] == "finished"


@pytest.mark.slow
def test_huggingface_callback_passes_sinks_through(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="transformers is an optional dependency")
    from test_huggingface import GateWatchTrainerCallback, MultiTask
    from test_huggingface import train as hf_train

    sink = Recorder()
    callback = GateWatchTrainerCallback(tasks=["ctr", "like"], module="net", every=2, flush_every=4, sinks=[sink])
    hf_train(MultiTask("dict"), tmp_path, callback, max_steps=4)
    assert sink.steps == [2, 4] and sink.findings >= 1 and sink.report is not None
