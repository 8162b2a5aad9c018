"""The Ablations page body: expert knock-outs, gate-dropout sweeps and training comparisons of one run.

Results are read from the run directory (``RUN/ablations/<kind>.parquet``), so they survive a page
reload. The buttons launch ``gatewatch ablate`` as a background process (the same code as the command
line); it writes ``RUN/ablations/<kind>/progress.json``, which the page polls for its progress bar, and
stops at its next step when the Stop button drops the stop flag. Launches are remembered per server
process, so the error of a launch that failed before it started (bad input) is shown after a reload too.

Rebuilding a model runs its factory. A factory outside the gatewatch package is only run after the user
ticks the box naming it (``--allow-factory``): the page never executes code named in a run directory on
its own.

The page itself never loads torch: it reads results, progress and ``model.json`` with torch-free modules, and
the models are rebuilt and run by the ``gatewatch ablate`` process it launches.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import pandas as pd
import streamlit as st

from ..ablation.errors import AblationError
from ..ablation.jobs import JobState, job_state, request_stop
from ..ablation.rates import (
    AUTO_PER_GATE,
    DEFAULT_RATES,
    DEFAULT_SEEDS,
    REMOVAL_SEEDS,
    TRAIN_RATES,
    TRAIN_SEEDS,
    TRAIN_STEPS,
    auto_per_gate,
    format_rates,
    knockout_plan,
    parse_rates,
)
from ..ablation.store import KINDS, ablations_dir, check_kind, read_result
from ..ablation.summaries import (
    comparison_summary,
    knockout_rows,
    knockout_summary,
    removal_summary,
    sweep_summary,
)
from ..figures.ablation import comparison_figure, knockout_heatmap, removal_figure, sweep_curves
from ..run_reader import read_meta
from ..training.model_info import CHECKPOINT_FILE, CheckpointError, is_trusted_factory, read_model_info
from . import ui

TITLES = {"knockout": "Expert knock-out", "dropout_sweep": "Gate-dropout sweep", "train": "Training with gate dropout",
          "task_removal": "Task removal"}
POLL_S = 1.0


# ------------------------------------------------------------------------------------------- launching (no Streamlit)
@dataclass
class Options:
    """What a launch asks for (the command-line options of ``gatewatch ablate``)."""

    split: str = "val"
    rates: list[float] = field(default_factory=list)
    seeds: int | None = None
    steps: int | None = None
    allow_factory: bool = False
    drop: list[str] = field(default_factory=list)  # task removal: the tasks to leave out (none: each in turn)
    gates: list[str] = field(default_factory=list)  # knock-out: the gates whose experts are knocked out (none: all)
    per_gate: int | str | None = "auto"  # knock-out: the most and least loaded n of each gate, None: all, "auto"
    experts: list[int] | None = None  # knock-out: only these expert indices of each gate (in place of per_gate)


def ablate_command(run_path: Path, kind: str, options: Options) -> list[str]:
    """The ``gatewatch ablate`` command line of one job."""
    check_kind(kind)
    flag = {"knockout": ["--knockout"], "dropout_sweep": ["--dropout-sweep"], "train": ["--train-compare"],
            "task_removal": ["--drop-task", *options.drop]}[kind]
    if kind in ("dropout_sweep", "train"):
        flag.append(format_rates(options.rates))
    cmd = [sys.executable, "-m", "gatewatch.cli", "ablate", str(run_path), *flag, "--split", options.split]
    if options.seeds is not None and kind != "knockout":
        cmd += ["--seeds", str(options.seeds)]
    if options.steps is not None and kind in ("train", "task_removal"):
        cmd += ["--steps", str(options.steps)]
    if kind == "knockout":
        cmd += [arg for gate in options.gates for arg in ("--gate", gate)]
        if options.experts is not None:
            cmd += [arg for e in options.experts for arg in ("--expert", str(e))]
        elif options.per_gate is None:
            cmd.append("--all-experts")
        elif options.per_gate != "auto":
            cmd += ["--per-gate", str(options.per_gate)]
    if options.allow_factory:
        cmd.append("--allow-factory")
    return cmd


@dataclass
class Launch:
    """A background ``gatewatch ablate`` process and the file holding its output."""

    proc: subprocess.Popen
    log: Path
    started: float

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip()
        except OSError:
            return ""


_LAUNCHES: dict[tuple[str, str], Launch] = {}  # per server process: survives page reloads
_LOCK = threading.Lock()


def launch(run_path: Path, kind: str, options: Options) -> Launch:
    """Start a job in the background, unless one of this kind is already running on the run."""
    key = (str(run_path), kind)
    with _LOCK:
        if _running(job_state(run_path, kind), _LAUNCHES.get(key)):
            raise AblationError(f"A {TITLES[kind].lower()} is already running on this run.")
        with tempfile.NamedTemporaryFile(prefix=f"gatewatch-{kind}-", suffix=".log", delete=False) as fh:
            log = Path(fh.name)
        with open(log, "wb") as out:
            proc = subprocess.Popen(ablate_command(run_path, kind, options), stdout=subprocess.DEVNULL,
                                    stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        _LAUNCHES[key] = Launch(proc, log, time.time())
        return _LAUNCHES[key]


def last_launch(run_path: Path, kind: str) -> Launch | None:
    return _LAUNCHES.get((str(run_path), kind))


def _job_running(state: JobState | None) -> TypeGuard[JobState]:
    return state is not None and state.status == "running"


def _running(state: JobState | None, launched: Launch | None) -> bool:
    """Whether a job is running: by its progress file, or by the process this server launched (which has not
    written that file while it still loads the model)."""
    return _job_running(state) or (launched is not None and launched.running)


def default_steps(run_path: Path) -> int:
    """Steps per comparison run: the run's own length (from run.json), at most TRAIN_STEPS."""
    steps = (read_meta(run_path)[0].get("user_config") or {}).get("steps")
    return min(steps, TRAIN_STEPS) if isinstance(steps, int) and steps > 0 else TRAIN_STEPS


def factory_check(run_path: Path) -> tuple[str | None, bool, str | None]:
    """``(factory, trusted, problem)``: the model factory of the run, whether it may run without asking, and why
    the run cannot be ablated (no checkpoint, unreadable model.json, no factory) or None."""
    if not (run_path / CHECKPOINT_FILE).is_file():
        return None, False, (
            f"This run saved no model ({CHECKPOINT_FILE}), so it cannot be ablated. Train it with "
            "gatewatch.training.train() (or call gatewatch.training.save_model() at the end of your loop).")
    try:
        info = read_model_info(run_path)
    except CheckpointError as err:
        return None, False, str(err)
    if info is None or info.factory is None:
        return None, False, ("This run's model.json names no model factory. Run the ablation from the command "
                             "line with your factory: gatewatch ablate RUN --knockout --factory module:function")
    return info.factory, is_trusted_factory(info.factory), None


REMEDY_CODES = ("polarization", "collapse", "dead_expert")  # findings whose remedy is gate dropout


def remedy_button(run_path: Path, run_id: str, status: str, codes: Sequence[str]) -> None:
    """On a finished run with a saved model and a finding that gate dropout remedies: a button that starts the
    gate-dropout sweep on that model, and a link to the Ablations page, where its progress and result show."""
    if status != "finished" or not set(codes) & set(REMEDY_CODES) or not (run_path / CHECKPOINT_FILE).is_file():
        return
    _, trusted, problem = factory_check(run_path)
    if problem is not None or not trusted:
        return
    st.markdown("#### Test the remedy")
    st.caption("Does gate dropout help this model? The sweep evaluates the saved model with gate outputs dropped at "
               f"rates {format_rates(DEFAULT_RATES)} ({len(DEFAULT_SEEDS)} seeds each).")
    if st.button("Run the gate-dropout sweep on this run", key=f"remedy:{run_path}", type="primary",
                 icon=":material/science:", disabled=_running(job_state(run_path, "dropout_sweep"),
                                                            last_launch(run_path, "dropout_sweep"))):
        try:
            launch(run_path, "dropout_sweep", Options(rates=list(DEFAULT_RATES), seeds=len(DEFAULT_SEEDS)))
        except AblationError as err:
            st.error(str(err))
            return
        st.success("The gate-dropout sweep is running on the saved model.", icon=":material/science:")
    if last_launch(run_path, "dropout_sweep") is not None or job_state(run_path, "dropout_sweep") is not None:
        st.page_link(ui.page_file("ablations"), label="Follow it and see the result on the Ablations page",
                     icon=":material/science:", query_params={"run": run_id})


# ------------------------------------------------------------------------------------------- the page
def render(run_path: Path, *, root: Path, selected: Sequence[Path]) -> None:
    """Draw the Ablations page for ``run_path`` (inside ``root``); ``selected``: the runs chosen on the Runs page."""
    st.markdown("What is each expert worth to each task, and does gate dropout help? Knock experts out, sweep "
                "gate dropout at evaluation, or retrain with gate dropout and compare gate health. Does a task hurt "
                "the others? Retrain without it and compare (task removal).")
    factory, trusted, problem = factory_check(run_path)
    allow = False
    if problem is None and not trusted:
        allow = st.checkbox(
            f"Run this run's own model code: `{factory}`", key=f"allow_factory:{run_path}",
            help="Rebuilding the model imports and runs this factory, which lies outside the gatewatch package. "
                 "Tick only if you trust the code the run directory names.")
    tabs = st.tabs([TITLES[k] for k in KINDS])
    for kind, tab in zip(KINDS, tabs, strict=True):
        with tab:
            blocked = problem or (None if trusted or allow else
                                  "Tick the box above to let the dashboard rebuild this model with its own code.")
            _controls(run_path, kind, blocked, allow)
            _results(run_path, kind, root, selected)


def _controls(run_path: Path, kind: str, blocked: str | None, allow: bool) -> None:
    key = f"{kind}:{run_path}"
    cols = st.columns([1, 2, 1.3, 1.3], vertical_alignment="bottom")  # room for a router's path among the gates
    options = Options(allow_factory=allow)
    help_text = ("Whose final metrics the runs are compared on." if kind in ("train", "task_removal") else
                 "The data the model is evaluated on.")
    options.split = cols[0].radio("Split", ["val", "test"], horizontal=True, key=f"split:{key}", help=help_text)
    rates_text = ""
    if kind == "task_removal":
        tasks = [str(t) for t in read_meta(run_path)[0].get("tasks") or []]
        options.drop = cols[1].multiselect("Tasks to leave out", tasks, key=f"drop:{key}",
                                           help="Each in turn; none chosen: every task in turn.")
        options.seeds = int(cols[2].number_input("Seeds", 1, 20, len(REMOVAL_SEEDS), key=f"seeds:{key}"))
    elif kind == "knockout":
        _knockout_controls(run_path, cols, key, options)
    else:
        default = DEFAULT_RATES if kind == "dropout_sweep" else TRAIN_RATES
        rates_text = cols[1].text_input("Gate dropout rates", format_rates(default), key=f"rates:{key}")
        seeds = DEFAULT_SEEDS if kind == "dropout_sweep" else TRAIN_SEEDS
        options.seeds = int(cols[2].number_input("Seeds", 1, 20, len(seeds), key=f"seeds:{key}"))
    if kind in ("train", "task_removal"):
        options.steps = int(cols[3].number_input("Steps per run", 1, 1_000_000, default_steps(run_path), step=100,
                                                 key=f"steps:{key}"))
    state, launched = job_state(run_path, kind), last_launch(run_path, kind)
    running = _running(state, launched)
    if blocked:
        st.info(blocked, icon=":material/block:")
    start = st.button(f"Run {TITLES[kind].lower()}", key=f"start:{key}", disabled=bool(blocked) or running,
                      type="primary", icon=":material/play_arrow:")
    if start:
        try:
            if kind in ("dropout_sweep", "train"):
                options.rates = parse_rates(rates_text)
            launch(run_path, kind, options)
        except AblationError as err:
            st.error(str(err))
        else:
            running = True
    if running:
        _progress(run_path, kind)
    else:
        _last_outcome(state, launched)


def recorded_gates(run_path: Path) -> list[tuple[str, int]]:
    """``(name, experts)`` of each gate run.json records."""
    return [(str(g["name"]), int(g.get("experts") or 0)) for g in read_meta(run_path)[0].get("gates") or []
            if isinstance(g, dict) and g.get("name")]


EXPERT_CHOICES = {"every expert": None, "the most and least loaded": "ends", "the experts I choose": "chosen"}


def _knockout_controls(run_path: Path, cols: Sequence, key: str, options: Options) -> None:
    """Which gates and experts the knock-out takes, and how many evaluations that is."""
    gates = recorded_gates(run_path)
    options.gates = cols[1].multiselect("Gates", [name for name, _ in gates], key=f"gates:{key}",
                                        help="Knock out the experts of these gates only; none chosen: every gate.")
    only = options.gates or None
    auto = auto_per_gate(gates, only)
    choice = cols[2].selectbox("Experts of each gate", list(EXPERT_CHOICES), index=0 if auto is None else 1,
                               key=f"which:{key}", help="Ranked by their load in the unmasked evaluation.")
    options.per_gate = None
    if EXPERT_CHOICES[choice] == "ends":
        options.per_gate = int(cols[3].number_input("Most and least loaded, each", 1, 64, auto or AUTO_PER_GATE,
                                                    key=f"per_gate:{key}"))
    elif EXPERT_CHOICES[choice] == "chosen":
        fewest = min((n for name, n in gates if only is None or name in only), default=0)
        options.experts = cols[3].multiselect(
            "Experts", list(range(fewest)), key=f"experts:{key}",
            help="By index; each is knocked out of each gate chosen, in turn. None chosen: every expert.") or None
    total = knockout_plan(gates, only, options.per_gate, options.experts)
    st.caption(f"{total:,} evaluation{'s' * (total != 1)} of the model on the split, one per expert knocked out (the "
               "progress bar shows the time left once it starts). On a router the expert's logit is masked before the "
               "top-k, so its tokens go to their next choice.")


@st.fragment(run_every=POLL_S)
def _progress(run_path: Path, kind: str) -> None:
    """The progress bar and Stop button of a running job; reruns the page when the job ends."""
    state = job_state(run_path, kind)
    if not _running(state, last_launch(run_path, kind)):
        st.rerun()
    if _job_running(state):
        st.progress(state.fraction, text=f"{state.message} ({state.done:,} / {state.total:,})")
    else:
        st.progress(0.0, text="starting: rebuilding the model and loading its data ...")
    if st.button("Stop", key=f"stop:{kind}:{run_path}", icon=":material/stop:",
                 help="Stops at the next step; nothing is written and earlier results stay."):
        request_stop(run_path, kind)
        st.toast("Stopping at the next step ...")


def _last_outcome(state: JobState | None, launched: Launch | None) -> None:
    """Why the last job did not produce a result (bad input, failure, stop)."""
    if launched is not None and launched.proc.returncode not in (None, 0) and (
            state is None or state.started < launched.started):
        st.error(launched.output() or f"gatewatch ablate exited with status {launched.proc.returncode}.")
    elif state is not None and state.status == "failed":
        st.error(f"The last job failed: {state.error}")
    elif state is not None and state.status in ("stopped", "cut off"):
        st.warning(f"The last job was {state.status} at {state.done:,} of {state.total:,} steps; nothing was "
                   "written, earlier results are shown.")


def _settings_caption(settings: dict) -> None:
    parts = [f"split {settings.get('split', '?')}", f"computed {settings.get('created', '?')}"]
    if settings.get("seeds"):
        parts.append(f"seeds {settings['seeds']}")
    if settings.get("steps"):
        parts.append(f"{settings['steps']:,} steps per run")
    st.caption(" - ".join(parts))


def _results(run_path: Path, kind: str, root: Path, selected: Sequence[Path]) -> None:
    found = read_result(run_path, kind)
    if found is None:
        ui.empty(f"No {TITLES[kind].lower()} results for this run yet.")
        return
    df, settings = found
    _settings_caption(settings)
    if kind == "knockout":
        ui.chart(knockout_heatmap(df), key=f"knockout:{run_path}")
        number = st.column_config.NumberColumn
        st.dataframe(knockout_summary(df), hide_index=True, column_config={
            "base": number("base", format="%.4g"), "worst_gate": "worst gate", "worst_expert": "worst expert",
            "max_harm": number("max harm", format="%+.3g", help="The worst knock-out's metric change, + = worse"),
            "total_harm": number("total harm", format="%.3g", help="The sum of the knock-outs' positive harms"),
            "concentration": number("concentration", format="%.2f", help="max harm / total harm: near 1 when one "
                                    "expert carries the task; empty when no knock-out harms it")})
        st.markdown("##### Each knock-out")
        st.dataframe(knockout_rows(df), hide_index=True, key=f"knockout_rows:{run_path}", column_config={
            "load": number("load", format="%.4f", help="The expert's share of the gate in the unmasked evaluation: "
                           "of the tokens' top-k choices for a router, of the weight for a dense gate"),
            "ablated_load": number("load knocked out", format="%.4f",
                                   help="Its share with it knocked out: 0 when the mask reaches the gate"),
            "base": number("base", format="%.4g"), "ablated": number("ablated", format="%.4g"),
            "delta": number("delta", format="%+.3g", help="ablated - base")})
    elif kind == "dropout_sweep":
        others = {p: read_result(p, kind) for p in selected if p != run_path}
        others = {p: r[0] for p, r in others.items() if r is not None}
        shown = df
        if others and st.toggle(f"Overlay the sweeps of {len(others)} other chosen run(s)", key=f"overlay:{run_path}"):
            shown = pd.concat([df.assign(run=_label(run_path, root))]
                              + [d.assign(run=_label(p, root)) for p, d in others.items()], ignore_index=True)
        ui.chart(sweep_curves(shown), key=f"sweep:{run_path}")
        st.dataframe(sweep_summary(df), hide_index=True)
    elif kind == "task_removal":
        summary = removal_summary(df)
        ui.chart(removal_figure(summary), key=f"removal:{run_path}")
        st.markdown("\n".join(f"- {s}" for s in summary["sentence"]))
        st.dataframe(summary.drop(columns="sentence"), hide_index=True)
    else:
        ui.chart(comparison_figure(df), key=f"train:{run_path}")
        st.dataframe(comparison_summary(df), hide_index=True)
        for child in df["run_dir"].drop_duplicates():
            path = ablations_dir(run_path).parent / child
            if path.is_dir() and path.resolve().is_relative_to(root.resolve()):
                st.page_link(ui.page_file("overview"), label=f"Open {child}", icon=":material/open_in_new:",
                             query_params={"run": _label(path, root)})


def _label(path: Path, root: Path) -> str:
    """A run's id in the dashboard: its path relative to the runs root."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix() or "."
    except ValueError:
        return path.name
