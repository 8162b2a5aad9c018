"""The demo's story: open the dashboard, then train a healthy MMoE and one that polarizes side by side, live.

Both train on UCI census-income (income / marital) in their own process with one torch thread, watched by
GateWatch (a flush every 5 s or 100 steps, so the dashboard follows them live); the terminal shows one
progress bar per run and prints the polarization finding, with its step and remedy, as soon as the run's
tables show it. The runs go to ``<out>/demo-<timestamp>/``; the committed sample runs are copied next to them
(``<out>/sample_runs``), so the dashboard lists both.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import subprocess
import sys
import time
import urllib.request
import webbrowser
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..app.launch import can_open_browser, streamlit_command
from ..app.state import env_with_root
from ..training.loop import TrainConfig

POLARIZING_NOTE = ("Chosen to polarize: census-income with 4 experts and lr 1e-2 polarizes in 6 of 10 seeds; seed "
                   "{seed} does. Watch the 'polarization' finding appear while it trains.")
HEALTHY_NOTE = "The healthy reference: the same data with 8 experts and lr 1e-3."
SEED = 0  # polarizes (the committed sample run mmoe-polarized is this setting and seed, 2,000 steps)
SAMPLE_RUNS = Path(__file__).resolve().parents[2] / "sample_runs"


def story_configs(steps: int, *, seed: int = SEED) -> dict[str, tuple[TrainConfig, str]]:
    """The two runs of the story: name -> (config, the note shown above the run)."""
    common: dict[str, Any] = {"model": "mmoe", "data": "census", "steps": steps, "batch_size": 256, "every": 10,
                              "flush_every": 100, "eval_every": max(1, steps // 4), "tensorboard": False}
    return {
        "polarizing-mmoe": (TrainConfig(**common, model_kwargs={"n_experts": 4}, lr=1e-2, seed=seed),
                            POLARIZING_NOTE.format(seed=seed)),
        "healthy-mmoe": (TrainConfig(**common, model_kwargs={"n_experts": 8}, lr=1e-3, seed=seed), HEALTHY_NOTE),
    }


def _child(name: str, config: dict[str, Any], out: str, note: str, queue: Any) -> None:
    """Train one run in a child process, reporting ``(name, step)`` every 10 steps and ``(name, "done")``."""
    import torch

    from ..training.loop import train

    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(**config)
        train(cfg, out, progress=False, note=note,
              on_step=lambda step, _: queue.put((name, step)) if step % 10 == 0 or step == cfg.steps else None)
        queue.put((name, "done"))
    except BaseException as err:  # reported by the parent, which stops the demo
        queue.put((name, f"error: {type(err).__name__}: {err}"))


def copy_sample_runs(root: Path) -> Path | None:
    """Copy the checkout's sample runs to ``root/sample_runs`` once (their ablations then stay out of the repo)."""
    target = root / "sample_runs"
    if not SAMPLE_RUNS.is_dir() or target.exists():
        return target if target.exists() else None
    shutil.copytree(SAMPLE_RUNS, target, ignore=shutil.ignore_patterns("ablations", "README.md"))
    return target


def start_dashboard(root: Path, port: int) -> tuple[subprocess.Popen, str]:
    """Serve the dashboard on ``root`` in the background; the process and its URL once it answers."""
    cmd = streamlit_command(root, port=port, address="127.0.0.1", browser=False)
    proc = subprocess.Popen(cmd, env=env_with_root(root), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"the dashboard did not start on port {port} (is the port taken? try --port)")


def first_polarization(run_dir: Path) -> Any:
    """The polarization finding of the run as the Overview shows it, or None (None while unreadable)."""
    from ..findings import find
    from ..run_reader import RunReadError, load_run

    try:
        return next((f for f in find(load_run(run_dir)) if f.code == "polarization"), None)
    except (RunReadError, OSError, ValueError):
        return None


def run_story(root: Path, *, steps: int, port: int, dashboard: bool, say: Callable[[str], None] = print) -> dict:
    """Open the dashboard on ``root`` (unless ``dashboard`` is False), train the two runs side by side, and
    return what happened: ``{"batch", "runs", "server", "url", "link", "finding_s", "finding_step", "total_s"}``
    (``finding_s``: seconds from the dashboard's start to the polarization finding, None when none showed)."""
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    copy_sample_runs(root)
    batch = root / time.strftime("demo-%Y%m%d-%H%M%S")
    configs = story_configs(steps)
    server, url = (start_dashboard(root, port) if dashboard else (None, None))
    start = time.monotonic()
    polar = batch / "polarizing-mmoe"
    link = f"{url}/overview?run={polar.relative_to(root).as_posix()}" if url else None
    if link:
        say(f"dashboard: {link}  (the Runs page lists these runs next to the sample runs)")
    say(POLARIZING_NOTE.format(seed=SEED))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(name, asdict(cfg), str(batch / name), note, queue), daemon=True)
             for name, (cfg, note) in configs.items()]
    for p in procs:
        p.start()
    say("loading census-income in both processes (downloaded and preprocessed once into the cache), then "
        "training ...")
    bars = {name: tqdm(total=cfg.steps, desc=f"{name:<16}", position=i, leave=True, dynamic_ncols=True,
                       file=sys.stdout) for i, (name, (cfg, _)) in enumerate(configs.items())}
    done: set[str] = set()
    started: set[str] = set()
    found, found_s, opened = None, None, False
    last_check = 0.0
    try:
        while len(done) < len(configs):
            try:
                name, what = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: no news this second
                name, what = None, None
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("the training processes ended without finishing") from None
            if isinstance(what, int):
                if name not in started:  # the clock of the bar starts at the first step, not at the data loading
                    started.add(name)
                    bars[name].reset(total=configs[name][0].steps)
                bars[name].n = what
                bars[name].refresh()
            elif what == "done":
                done.add(name)
            elif isinstance(what, str):
                raise RuntimeError(f"{name}: {what}")
            if link and not opened and (polar / "run.json").exists() and can_open_browser():
                opened = webbrowser.open(link)
            if found is None and time.monotonic() - last_check > 2.0:
                last_check = time.monotonic()
                found = first_polarization(polar)
                if found is not None:
                    found_s = time.monotonic() - start
                    tqdm.write(f"finding after {found_s:.0f} s: {found.message} (since step {found.step})\n"
                               f"  remedy: {found.remedy}", file=sys.stdout)
    except BaseException:
        if server is not None:  # the demo failed or was interrupted: do not leave the dashboard behind
            server.terminate()
        raise
    finally:
        for bar in bars.values():
            bar.close()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    if found is None:
        found = first_polarization(polar)
        found_s = time.monotonic() - start if found is not None else None
    total_s = time.monotonic() - start
    say(f"both runs finished in {total_s:.0f} s, with their checkpoints, in {batch}")
    if found is None:
        say("this time the run did not polarize (the setting polarizes in 6 of 10 seeds)")
    elif link:
        say("on the run's Ablations page, 'Run gate-dropout sweep' tests the remedy on the saved model")
    return {"batch": batch, "runs": [batch / n for n in configs], "server": server, "url": url, "link": link,
            "finding_s": found_s, "finding_step": None if found is None else found.step, "total_s": total_s}
