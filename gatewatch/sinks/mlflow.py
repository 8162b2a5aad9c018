"""MLflow: gatewatch's scalars, findings and report in an MLflow run (``pip install 'gatewatch[mlflow]'``).

::

    from gatewatch.sinks import MLflowSink

    sink = MLflowSink(tracking_uri="sqlite:///mlflow.db", experiment="mmoe")
    watch = gw.GateWatch(model, tasks=TASKS, log_dir="runs/a", sinks=[sink])

* The run: ``run_id``, else the active run (``mlflow.active_run()``, when ``tracking_uri`` is not another
  store), else a run the sink creates in ``experiment`` (default: ``$MLFLOW_EXPERIMENT_NAME``, then
  ``$MLFLOW_EXPERIMENT_ID``, then MLflow's Default experiment), named after the run directory and ended at
  close (``FAILED`` when the watch closed on an error). It is looked up when the watch starts, on rank 0
  only, so the sink can be built on every rank.
* Scalars: those TensorBoard charts (:mod:`gatewatch.sinks.scalars`), every window, each at its own step,
  named ``<prefix><tag>`` (``gatewatch/gate/ctr/entropy``). MLflow allows only letters, digits and
  ``_ - . : / space`` in a name: the ``~`` of a conflict pair becomes ``-vs-``
  (``gatewatch/conflict/ctr-vs-cvr/cosine``), any other character ``_``. They are sent with
  ``MlflowClient.log_batch``, 1,000 metrics a call (MLflow's limit).
* Findings of the recent windows, at each flush: tags ``gatewatch.finding.<code>`` (``"warning @ step 120:
  ctr"``) and ``gatewatch.findings`` (``"1 warning @ step 200"``), deleted for findings that are gone; the
  artifact ``gatewatch/findings.json`` (the list, rewritten when it changed).
* At close: the report of the recent windows (``gatewatch report --json``) as the artifact
  ``gatewatch/report.json``, and tags ``gatewatch.status`` and ``gatewatch.run_dir``.

A tracker that fails never stops training (:mod:`gatewatch.sinks.tracker`). The calls run at flush time in the
training process: against a tracking server that does not answer, each waits for MLflow's HTTP timeout and
retries; bound them with ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from .tracker import TrackerSink, finding_summaries, findings_count

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on the metrics of one log_batch call
TAG_PATH_CHARS = 4000  # a run directory's path in a tag: its end, when longer
_NOT_ALLOWED = re.compile(r"[^\w\-. :/]")


def mlflow_name(tag: str) -> str:
    """``tag`` as a valid MLflow metric or tag name (see the module docstring)."""
    name = _NOT_ALLOWED.sub("_", tag.replace("~", "-vs-"))
    return "/".join("_" if part in ("", ".", "..") else part for part in name.split("/"))


class MLflowSink(TrackerSink):
    """Logs a watch's scalars, findings and report into an MLflow run (see the module docstring).

    Args:
        run_id: log into this run (left open at close).
        tracking_uri: the tracking store, e.g. ``"sqlite:///mlflow.db"`` or ``"http://host:5000"``;
            default: MLflow's own (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``).
        experiment: name of the experiment of a run the sink creates (created if missing).
        prefix: put before every metric name; artifacts go in its folder, tags start with its dotted form.
        max_pending: scalars kept while MLflow fails (the oldest are dropped beyond that).
    """

    tracker = "MLflow"

    def __init__(
        self, run_id: str | None = None, tracking_uri: str | None = None, experiment: str | None = None,
        prefix: str = "gatewatch/", *, max_pending: int = 1_000_000,
    ) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError as err:
            raise ImportError("MLflowSink needs MLflow: pip install 'gatewatch[mlflow]' (or pip install mlflow)."
                              ) from err
        super().__init__(prefix, max_pending)
        self.run_id, self.tracking_uri, self.experiment = run_id, tracking_uri, experiment
        self.owned = False  # True: the sink created the run, and ends it at close
        self.client: Any = None
        self.folder = prefix.strip("/") or "gatewatch"  # artifacts
        self.tag_prefix = mlflow_name(self.folder.replace("/", ".")) + "."
        self._finding_tags: set[str] = set()

    def _start(self) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri or mlflow.get_tracking_uri())
        if self.run_id is not None:
            return
        active = mlflow.active_run()
        if active is not None and self.tracking_uri in (None, mlflow.get_tracking_uri()):
            self.run_id = active.info.run_id
            return
        run = self.client.create_run(self._experiment_id(), run_name=self.name,
                                     tags={f"{self.tag_prefix}run": str(self.name)})
        self.run_id, self.owned = run.info.run_id, True

    def _experiment_id(self) -> str:
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"  # "0": the Default experiment of every store
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _send(self) -> None:
        from mlflow.entities import Metric

        while self.pending:
            chunk = self.pending[:MAX_METRICS_PER_BATCH]
            stamp = int(time.time() * 1000)
            metrics = [Metric(mlflow_name(self.prefix + tag), value, stamp, step) for tag, value, step in chunk]
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
            del self.pending[: len(chunk)]

    def _log_findings(self, step: int, findings: list[dict[str, Any]], changed: bool) -> None:
        from mlflow.entities import RunTag

        tags = {f"{self.tag_prefix}finding.{mlflow_name(code)}": text
                for code, text in finding_summaries(findings).items()}
        tags[f"{self.tag_prefix}findings"] = f"{findings_count(findings)} @ step {step}"
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        for gone in sorted(self._finding_tags - set(tags)):
            self.client.delete_tag(self.run_id, gone)
        self._finding_tags = set(tags)
        if changed:
            text = json.dumps({"step": step, "findings": findings}, indent=2, default=str)
            self.client.log_text(self.run_id, text, f"{self.folder}/findings.json")

    def _report(self, report: dict[str, Any]) -> None:
        self.client.log_text(self.run_id, json.dumps(report, indent=2, default=str), f"{self.folder}/report.json")
        self.client.set_tag(self.run_id, f"{self.tag_prefix}status", str(report.get("status")))
        if report.get("path"):
            self.client.set_tag(self.run_id, f"{self.tag_prefix}run_dir", str(report["path"])[-TAG_PATH_CHARS:])

    def _end(self, report: dict[str, Any] | None) -> None:
        if self.owned:
            ok = report is None or report.get("status") == "finished"
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")

__all__ = ["MAX_METRICS_PER_BATCH", "MLflowSink", "mlflow_name"]
