"""Weights & Biases: gatewatch's scalars, findings and report in a W&B run (``pip install 'gatewatch[wandb]'``).

::

    from gatewatch.sinks import WandbSink

    watch = gw.GateWatch(model, tasks=TASKS, log_dir="runs/a", sinks=[WandbSink(project="mmoe")])

* The run: ``run``, else the active one (``wandb.run``), else one the sink starts with
  ``wandb.init(project=project, mode=mode, name=<run directory name>)`` and finishes at close (exit code 1
  when the watch closed on an error). It is looked up when the watch starts, on rank 0 only, so the sink can
  be built on every rank.
* Steps: W&B's own step only increases, and gatewatch logs the windows of a flush (earlier steps) at flush
  time. The sink defines a step metric of its own, ``<prefix>step``, as the x-axis of ``<prefix>*``, and logs
  one row per window ``{"gatewatch/step": step, "gatewatch/gate/ctr/entropy": ...}``: no window is dropped,
  whatever W&B's step is. Each row advances W&B's own step by one (as any ``wandb.log`` call without
  ``step=``); log your own metrics against a step metric of yours too (``define_metric``), not with ``step=``.
* Scalars: those TensorBoard charts (:mod:`gatewatch.sinks.scalars`), every window, named ``<prefix><tag>``.
* Findings of the recent windows, at each flush: ``run.summary["gatewatch/finding/<code>"]``
  (``"warning @ step 120: ctr"``, removed when the finding is gone), ``run.summary["gatewatch/findings_count"]``
  (``"1 warning @ step 200"``), and a ``wandb.Table`` logged as ``gatewatch/findings`` when the list changed.
* At close: the report of the recent windows flattened into the summary (``gatewatch/report/...``: the last
  window of each gate, balance, conflict, coverage) and, whole, as the artifact ``gatewatch-report-<run id>``
  (type ``gatewatch-report``, file ``report.json``).

Works offline (``mode="offline"``; ``wandb sync`` uploads later). A tracker that fails never stops training
(:mod:`gatewatch.sinks.tracker`).
"""

from __future__ import annotations

import json
from typing import Any

from .tracker import TrackerSink, by_step, finding_summaries, findings_count

FINDING_COLUMNS = ("code", "severity", "gate", "task", "expert", "step", "message", "remedy", "chart")
REPORT_LEFT_OUT = ("findings", "thresholds", "hot_spots")  # the table / the artifact has them


def flatten_report(report: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scalars of a report as flat ``a/b/c`` keys: lists of records are keyed by their name, gate or task
    pair; lists of numbers are left out (the artifact has them)."""
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in REPORT_LEFT_OUT:
                    walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, list):
            if value and all(isinstance(v, dict) for v in value):
                for i, item in enumerate(value):
                    fields = {k: v for k, v in item.items() if k not in ("name", "gate", "tasks")}
                    walk(fields, f"{key}/{_label(item, i)}")
        elif isinstance(value, (bool, int, float, str)):
            out[prefix + key] = value

    walk(report, "")
    return out


def _label(item: dict[str, Any], index: int) -> str:
    if item.get("name") is not None:
        return str(item["name"])
    if item.get("gate") is not None:
        return str(item["gate"])
    if isinstance(item.get("tasks"), list):
        return "~".join(map(str, item["tasks"]))
    return str(index)


class WandbSink(TrackerSink):
    """Logs a watch's scalars, findings and report into a W&B run (see the module docstring).

    Args:
        run: log into this run (left open at close).
        project: project of a run the sink starts.
        mode: ``"online"``, ``"offline"`` or ``"disabled"`` for a run the sink starts (default: W&B's own,
            e.g. ``WANDB_MODE``).
        prefix: put before every key (not empty: ``<prefix>*`` gets gatewatch's step metric).
        max_pending: scalars kept while W&B fails (the oldest are dropped beyond that).
    """

    tracker = "W&B"

    def __init__(
        self, run: Any = None, project: str | None = None, mode: str | None = None, prefix: str = "gatewatch/", *,
        max_pending: int = 1_000_000,
    ) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ImportError("WandbSink needs wandb: pip install 'gatewatch[wandb]' (or pip install wandb).") from err
        if not prefix:
            raise ValueError("WandbSink needs a prefix (e.g. 'gatewatch/'): gatewatch's step metric is the x-axis of "
                             "every '<prefix>*' key, and an empty prefix would claim all of the run's keys.")
        super().__init__(prefix, max_pending)
        self.run, self.project, self.mode = run, project, mode
        self.owned = False  # True: the sink started the run, and finishes it at close
        self.step_key = f"{prefix}step"
        self._finding_keys: set[str] = set()

    def _start(self) -> None:
        import wandb

        if self.run is None and wandb.run is not None:
            self.run = wandb.run
        elif self.run is None:
            self.run = wandb.init(project=self.project, mode=self.mode, name=self.name)
            self.owned = True
        self.run.define_metric(self.step_key)
        self.run.define_metric(f"{self.prefix}*", step_metric=self.step_key)

    def _send(self) -> None:
        logged: set[int] = set()
        try:
            for step, row in by_step(self.pending):
                self.run.log({self.step_key: step, **{self.prefix + tag: value for tag, value in row.items()}})
                logged.add(step)
        finally:  # a failure midway keeps the rows not logged yet
            self.pending = [s for s in self.pending if s[2] not in logged]

    def _log_findings(self, step: int, findings: list[dict[str, Any]], changed: bool) -> None:
        import wandb

        summary = {f"{self.prefix}finding/{code}": text for code, text in finding_summaries(findings).items()}
        summary[f"{self.prefix}findings_count"] = f"{findings_count(findings)} @ step {step}"
        for gone in sorted(self._finding_keys - set(summary)):
            del self.run.summary[gone]
        self.run.summary.update(summary)
        self._finding_keys = set(summary)
        if not changed:
            return
        rows = [[_cell(f.get(c)) for c in FINDING_COLUMNS] for f in findings]
        table = wandb.Table(columns=list(FINDING_COLUMNS), data=rows)
        self.run.log({self.step_key: step, f"{self.prefix}findings": table})

    def _report(self, report: dict[str, Any]) -> None:
        import wandb

        self.run.summary.update(flatten_report(report, f"{self.prefix}report/"))
        artifact = wandb.Artifact(f"gatewatch-report-{self.run.id}", type="gatewatch-report",
                                  metadata={"run_dir": report.get("path"), "status": report.get("status")})
        with artifact.new_file("report.json", mode="w") as f:
            json.dump(report, f, indent=2, default=str)
        self.run.log_artifact(artifact)

    def _end(self, report: dict[str, Any] | None) -> None:
        if self.owned:
            ok = report is None or report.get("status") == "finished"
            self.run.finish(exit_code=0 if ok else 1)


def _cell(value: Any) -> Any:
    """A table cell: text, or the step (W&B tables want one type per column)."""
    return value if value is None or isinstance(value, int) else str(value)


__all__ = ["WandbSink", "flatten_report"]
