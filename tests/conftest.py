"""Shared test helpers: a tiny MMoE-like model with controllable gates, a training loop, and the run
directories that several test modules read (fixtures)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from _runs_factory import make_runs
from torch import nn

import gatewatch as gw

torch.set_num_threads(1)


class LogitOffset(nn.Module):
    """Adds a fixed (non-trainable) offset to gate logits: a way to force a gate's choice in tests."""

    def __init__(self, n_experts: int) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(n_experts))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.offset


class TinyMMoE(nn.Module):
    """MMoE with one ``Sequential(Linear, LogitOffset, Softmax)`` gate per task in ``self.gates``."""

    def __init__(self, in_dim: int, n_experts: int, tasks: Sequence[str], hidden: int) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU()) for _ in range(n_experts))
        self.gates = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(in_dim, n_experts), LogitOffset(n_experts), nn.Softmax(-1)) for t in tasks}
        )
        self.towers = nn.ModuleDict({t: nn.Linear(hidden, 1) for t in tasks})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = torch.stack([e(x) for e in self.experts], 1)  # [N, E, H]
        return [self.towers[t]((self.gates[t](x).unsqueeze(-1) * f).sum(1)).squeeze(-1) for t in self.tasks]

    def force_gate(self, task: str, offset: Sequence[float], *, freeze: bool = True) -> None:
        """Add ``offset`` to the logits of ``task``'s gate; ``freeze`` zeroes and freezes its Linear too."""
        linear, shift, _ = self.gates[task]
        shift.offset.copy_(torch.tensor(offset, dtype=torch.float32))
        if freeze:
            with torch.no_grad():
                linear.weight.zero_()
                linear.bias.zero_()
            linear.requires_grad_(False)


def tiny_mmoe(
    in_dim: int = 12, n_experts: int = 4, tasks: Sequence[str] = ("ctr", "like"), hidden: int = 8, seed: int = 0
) -> TinyMMoE:
    """A small MMoE whose gates discovery finds (``gates.<task>.2`` are the softmax modules)."""
    torch.manual_seed(seed)
    return TinyMMoE(in_dim, n_experts, tasks, hidden)


def batch(step: int, n: int = 64, in_dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible batch and its binary target (depends only on ``step``)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, in_dim, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).float()


def task_losses(outputs: Sequence[torch.Tensor], y: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """Binary cross-entropy per task; the second task predicts the complement."""
    targets = [y if i % 2 == 0 else 1 - y for i in range(len(tasks))]
    bce = nn.functional.binary_cross_entropy_with_logits
    return {t: bce(o, tg) for t, o, tg in zip(tasks, outputs, targets, strict=True)}


def train(
    model: TinyMMoE, watch: gw.GateWatch | None, steps: int, *, lr: float = 1e-2, n: int = 64, use_backward: bool = True
) -> TinyMMoE:
    """``steps`` Adam steps on :func:`batch` data; with a watch, through ``watch.backward`` (or
    ``watch.log_losses`` when ``use_backward`` is False) and ``watch.step()``."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    in_dim = model.experts[0][0].in_features
    for step in range(steps):
        x, y = batch(step, n, in_dim)
        losses = task_losses(model(x), y, model.tasks)
        if watch is None:
            sum(losses.values()).backward()
        elif use_backward:
            watch.backward(losses)
        else:
            watch.log_losses(losses).backward()
        opt.step()
        opt.zero_grad()
        if watch is not None:
            watch.step()
    return model



@pytest.fixture(scope="session", autouse=True)
def summary_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The summaries of runs without summary.json that cannot be written into the run (the sample runs, live runs)
    go to a folder of the test session, not to the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("summaries")
        patch.setenv("GATEWATCH_SUMMARIES", str(folder))
        yield folder


@pytest.fixture(scope="session")
def standard_run_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The standard runs of :func:`_runs_factory.make_runs` (healthy, polarized, one expert, one task, routers,
    cut off, corrupt, live), trained once per test session for the dashboard, figure and browser tests."""
    return make_runs(tmp_path_factory.mktemp("dashboard_runs"))
