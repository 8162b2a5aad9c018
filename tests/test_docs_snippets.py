"""Every ```python block of README.md and docs/*.md runs as typed, or says on its fence why it cannot.

The blocks of one file run in order in one fresh namespace, in a temporary working directory. What a block
takes from the reader's own code (``model``, ``loader``, ``opt`` ...) comes from that file's entry in
``SETUPS`` below, never from hidden text in the docs. Skipped: blocks fenced ```python no-run: <reason>, and
blocks that begin with a ``# path/to/file.py`` line (files of an example package, run by the test named in
``FILE_BLOCKS``). docs/guide.md runs in tests/test_foreign_models.py::test_guide_snippets_run.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from plotly.io import renderers
from plotly.io._base_renderers import ExternalRenderer

import gatewatch as gw
from gatewatch import registry as quantities
from gatewatch.models import MMoE
from gatewatch.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_ELSEWHERE = {"docs/guide.md": "tests/test_foreign_models.py::test_guide_snippets_run"}
FILE_BLOCKS = {"docs/quantities.md": "tests/test_docs_quantity.py"}
FENCE = re.compile(r"^(`{3,}|~{3,})\s*(.*)$")
FILE_LINE = re.compile(r"# [\w./-]+\.py$")
NO_RUN = re.compile(r"python no-run: (\S.*)$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    info: str  # the fence's info string ("python", "python no-run: ...", "bash", "")
    code: str

    @property
    def is_file(self) -> bool:
        return self.info == "python" and bool(FILE_LINE.fullmatch(self.code.split("\n", 1)[0]))

    @property
    def runs(self) -> bool:
        return self.info == "python" and not self.is_file


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (CommonMark fences at the start of a line)."""
    found: list[Block] = []
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening.group(1), i
        closing = re.compile(rf"{re.escape(fence[0])}{{{len(fence)},}}\s*")
        i += 1
        while i < len(lines) and not closing.fullmatch(lines[i]):
            i += 1
        found.append(Block(start + 1, opening.group(2).strip(), "\n".join(lines[start + 1 : i]) + "\n"))
        i += 1
    return found


# ---------------------------------------------------------------- what the docs take from the reader's code
TASKS = ["ctr", "like"]


def tiny_mmoe(tasks: list[str] = TASKS, **kwargs: Any) -> MMoE:
    torch.manual_seed(0)
    return MMoE(in_dim=8, n_experts=3, expert_hidden=(), expert_dim=4, tasks=tasks, **kwargs)


def batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """``(x, ys)`` pairs: ``ys[k]`` is task k's binary target."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(size, 8, generator=g)
        out.append((x, [(x[:, 0] > 0).float(), (x[:, 0] + x[:, 1] > 0).float()]))
    return out


def record_run(log_dir: str, model: MMoE, steps: int = 20, **watch_kwargs: Any) -> gw.Run:
    bce = F.binary_cross_entropy_with_logits
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, every=5, tensorboard=False, **watch_kwargs) as watch:
        for x, ys in batches(steps):
            watch.backward({t: bce(p, y) for t, p, y in zip(TASKS, model(x), ys, strict=True)})
            opt.step()
            opt.zero_grad()
            watch.step()
    return gw.load_run(log_dir)


def training_loop(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A model with gates named ``ctr`` / ``like``, 50 batches, the loss, an optimizer and AMP's GradScaler."""
    model = tiny_mmoe()
    return {"model": model, "loader": batches(50), "bce": F.binary_cross_entropy_with_logits,
            "opt": torch.optim.Adam(model.parameters(), lr=1e-2), "scaler": torch.amp.GradScaler("cpu")}


def ablation_data(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A model with tasks ``ctr`` / ``cvr``, a batch, validation data, and a run trained into runs/mmoe."""
    train(TrainConfig(model_kwargs={"n_experts": 3, "expert_hidden": [], "expert_dim": 4, "tower_hidden": []},
                      data_kwargs={"n_train": 256, "n_val": 64, "n_test": 64, "dim": 6, "n_sin": 2},
                      steps=50, batch_size=32, lr=1e-2, every=50, flush_every=500, tensorboard=False),
          "runs/mmoe", progress=False)
    g = torch.Generator().manual_seed(1)
    x_val = torch.randn(64, 8, generator=g)
    y_val = torch.stack([(x_val[:, 0] > 0).float(), (x_val[:, 1] > 0).float()], 1)
    return {"model": tiny_mmoe(["ctr", "cvr"]), "x": torch.randn(16, 8, generator=g), "x_val": x_val, "y_val": y_val}


def dashboard_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """runs/exp1 (gates ``ctr`` / ``like``, conflict every 2 steps), and runs ``a`` (gate dropout) and ``b``."""
    b = record_run("runs/exp1", tiny_mmoe(), conflict_every=2)
    return {"a": record_run("runs/dropout", tiny_mmoe(gate_dropout=0.1)), "b": b}


def importable_quantity(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The doc's own two files written as the package my_quantities (cwd on sys.path), and a model."""
    for block in filter(lambda b: b.is_file, blocks(ROOT / "docs" / "quantities.md")):
        path = Path(block.code.split("\n", 1)[0][2:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code)
        for package in path.parents[:-1]:
            (package / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(Path.cwd()))
    monkeypatch.setattr(quantities, "QUANTITIES", list(quantities.QUANTITIES))
    return {"model": tiny_mmoe()}


SETUPS: dict[str, Callable[[pytest.MonkeyPatch], dict[str, Any]]] = {
    "README.md": training_loop,
    "docs/conflict.md": training_loop,
    "docs/ablations.md": ablation_data,
    "docs/dashboard.md": dashboard_runs,
    "docs/quantities.md": importable_quantity,
}


def conflict_steps(run: gw.Run) -> list[int]:
    return sorted(set(run.table("conflict")["step"]))


# what the blocks of a file must have left behind: (namespace, figures shown) -> True
CHECKS: dict[str, Callable[[dict[str, Any], list[dict]], bool]] = {
    "README.md": lambda ns, shown: gw.load_run("runs/exp1").steps == 50,
    "docs/conflict.md": lambda ns, shown: ns["watch"].closed and conflict_steps(gw.load_run("runs/exp1")) == [50, 100],
    "docs/ablations.md": lambda ns, shown: len(ns["df"]) > 0 and Path("runs/mmoe/ablations/train.parquet").is_file(),
    "docs/dashboard.md": lambda ns, shown: len(shown) == 6,
    "docs/guard.md": lambda ns, shown: ns["watch"].closed and ns["watch"].guard.active == [],
    "docs/quantities.md": lambda ns, shown: "input_range" in [q.name for q in ns["watch"].quantities],
}


class Shown(ExternalRenderer):
    """A plotly renderer that keeps each figure shown instead of opening a browser."""

    def __init__(self) -> None:
        self.figures: list[dict] = []

    def render(self, fig: dict) -> None:
        self.figures.append(fig)


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    renderer = Shown()
    # the registry's own dict: plotly's RenderersConfig has no .get, and its __delitem__ raises AttributeError
    monkeypatch.setitem(renderers._renderers, "docs-test", renderer)
    monkeypatch.setattr(renderers, "default", "docs-test")
    return renderer.figures


SLOW_DOCS = {"docs/ablations.md"}  # trains short runs: in the full suite only


def runnable_docs() -> list[str]:
    return [rel(p) for p in DOCS if rel(p) not in RUN_ELSEWHERE]


def doc_params() -> list[Any]:
    return [pytest.param(d, marks=pytest.mark.slow) if d in SLOW_DOCS else d for d in runnable_docs()]


@pytest.mark.parametrize("doc", doc_params())
@pytest.mark.slow
def test_doc_python_blocks_run_as_typed(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        shown: list[dict]) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    setup = SETUPS.get(doc)
    if setup is not None:
        namespace.update(setup(monkeypatch))
    try:
        for block in filter(lambda b: b.runs, blocks(ROOT / doc)):
            code = compile("\n" * block.line + block.code, doc, "exec")  # tracebacks give the doc's own lines
            try:
                exec(code, namespace)
            except Exception as err:
                raise AssertionError(f"{doc}: the python block at line {block.line} failed: "
                                     f"{type(err).__name__}: {err}") from err
        if doc in CHECKS:
            assert CHECKS[doc](namespace, shown), f"{doc}: the blocks ran but did not do what the text says"
    finally:
        for value in namespace.values():
            if isinstance(value, gw.GateWatch) and not value.closed:
                value.close()
        for name, module in list(sys.modules.items()):  # packages the blocks imported from the folder
            if Path(getattr(module, "__file__", None) or "/").is_relative_to(tmp_path):
                del sys.modules[name]


def test_every_setup_and_check_belongs_to_a_doc_with_blocks_that_run() -> None:
    with_runs = {d for d in runnable_docs() if any(b.runs for b in blocks(ROOT / d))}
    assert set(SETUPS) <= with_runs and set(CHECKS) <= with_runs
    assert set(CHECKS) == with_runs, "say what a doc's blocks must leave behind"


def test_file_blocks_are_run_by_their_own_test() -> None:
    for path in DOCS:
        if any(b.is_file for b in blocks(path)):
            assert rel(path) in FILE_BLOCKS, f"{rel(path)}: blocks that are files, and no test writes them"
            assert (ROOT / FILE_BLOCKS[rel(path)]).is_file()


def fence_problem(info: str) -> str | None:
    """Why a fence's info string breaks the convention: ```python runs, ```python no-run: <reason> does not.

    GitHub highlights by the info string's first word, so "python no-run: ..." renders as Python; CommonMark
    allows no backtick in a backtick fence's info string (such a line opens no code block at all)."""
    if info == "python" or (NO_RUN.fullmatch(info) and "`" not in info):
        return None
    if "no-run" in info:
        return "write ```python no-run: <the reason, without backticks>"
    if info.split(" ", 1)[0].lower() in ("python", "py", "python3", "pycon"):
        return "write ```python (runs) or ```python no-run: <reason>; nothing runs other Python fences"
    return None


@pytest.mark.parametrize(("info", "ok"), [
    ("python", True), ("bash", True), ("", True), ("python no-run: needs a GPU", True),
    ("python no-run", False), ("python no-run:", False), ("python no-run:  ", False), ("python  no-run: x", False),
    ("python no-run: needs `torchrun`", False), ("py", False), ("Python", False), ("bash no-run: x", False),
])
def test_fence_convention(info: str, ok: bool) -> None:
    assert (fence_problem(info) is None) == ok


def test_every_python_fence_runs_or_says_why_not() -> None:
    bad = [f"{rel(path)}:{b.line}: ```{b.info}: {fence_problem(b.info)}"
           for path in DOCS for b in blocks(path) if fence_problem(b.info)]
    assert not bad, "\n".join(bad)


def test_the_fence_parser_sees_every_python_block() -> None:
    for path in DOCS:
        text = path.read_text()
        assert len([b for b in blocks(path) if b.info.startswith("python")]) == len(
            re.findall(r"^```python", text, flags=re.M)), rel(path)
