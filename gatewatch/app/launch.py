"""``gatewatch dashboard [RUNS_DIR] [--port N] [--no-browser]``: start the Streamlit dashboard on a folder of runs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..exit_codes import EXIT_BAD_INPUT
from .state import default_root, env_with_root

MAIN = Path(__file__).with_name("main.py")
DEFAULT_PORT = 8501


def can_open_browser() -> bool:
    """Whether a browser window can appear: a desktop session (a display, or macOS / Windows)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def streamlit_command(root: Path, *, port: int, address: str, browser: bool) -> list[str]:
    """The command line that serves the dashboard on ``root`` (never waiting on a first-run prompt): Streamlit's,
    through :mod:`gatewatch.app.serve`, which loads the first page's modules while the server starts."""
    headless = not (browser and can_open_browser())
    return [
        sys.executable, "-m", "gatewatch.app.serve", "run", str(MAIN),
        "--server.port", str(port), "--server.address", address,
        "--server.headless", "true" if headless else "false", "--server.showEmailPrompt", "false",
        "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
        "--", "--runs", str(root),
    ]


def serve(runs_dir: str | os.PathLike[str] | None = None, *, port: int = DEFAULT_PORT, address: str = "127.0.0.1",
          browser: bool = True) -> int:
    """Serve the dashboard on ``runs_dir`` until interrupted (exit status of the server); 2 when the folder of
    runs does not exist. ``runs_dir`` None: the default root (``sample_runs/`` of a checkout, else ``./runs``)."""
    root = Path(runs_dir) if runs_dir else default_root()
    root = root.expanduser().resolve()
    if not root.is_dir():
        print(f"gatewatch dashboard: {root} is not a folder. Pass the folder that holds your runs "
              "(the log_dir of GateWatch, or its parent): gatewatch dashboard RUNS_DIR", file=sys.stderr)
        return EXIT_BAD_INPUT
    host = "localhost" if address in ("127.0.0.1", "0.0.0.0") else address
    print(f"gatewatch dashboard: serving runs below {root} at http://{host}:{port}", flush=True)
    cmd = streamlit_command(root, port=port, address=address, browser=browser)
    if os.name == "posix":  # the server takes this process's place, so signals (Ctrl-C, kill) reach it directly
        os.execve(sys.executable, cmd, env_with_root(root))
    proc = subprocess.Popen(cmd, env=env_with_root(root))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the server got the same Ctrl-C; let it finish
        return proc.wait()


def cmd_dashboard(args: argparse.Namespace) -> int:
    """``gatewatch dashboard``: :func:`serve` with the parsed options."""
    return serve(args.runs_dir, port=args.port, address=args.address, browser=not args.no_browser)


def add_dashboard(sub: argparse._SubParsersAction) -> None:
    """Register ``gatewatch dashboard``."""
    p = sub.add_parser("dashboard", help="open the dashboard on a folder of runs")
    p.add_argument("runs_dir", nargs="?", default=None,
                   help="folder holding run directories (default: sample_runs/ of a checkout, else ./runs)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 to serve other machines)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.set_defaults(func=cmd_dashboard)
