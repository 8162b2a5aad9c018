"""The capture kit, checked over every registered quantity's capture half: declared states, the per-window buffer,
the one shared hook per module, activation checkpointing and the per-batch context.

Two small models make every quantity active: an MMoE (gates, losses, conflict, conflict proxy, guard, similarity)
and a two-task model with a sparse sigmoid router with an expert bias (routers, co-activation, routing stability)."""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gatewatch as gw
from gatewatch import registry
from gatewatch.capture.gate_hooks import HookCall
from gatewatch.capture.quantity import WINDOW_REDUCTIONS, CaptureContext, Quantity, Reduction
from gatewatch.capture.reducer import combine
from gatewatch.capture.settings import quantity_keywords
from gatewatch.capture.window_buffer import WindowBuffer
from gatewatch.declarations import ReadHalf
from gatewatch.models import MMoE

TASKS = ["a", "b"]
IN_DIM, N = 6, 16
OPTIONS: dict[str, Any] = {"conflict_every": 1, "conflict_proxy": True, "similarity_every": 1,
                           "guard": gw.Guard(rules=("collapse",)), "sample_groups": ["even", "odd"]}
ROUTED_OPTIONS: dict[str, Any] = {"saturation_every": 1}
ROUTED = {"routers", "coactivation", "routing_stability"}  # the quantities the routed model makes active
NO_CAPTURE = {"seesaw"}  # registered quantities that only read (their build returns None)


class SigmoidRouter(nn.Module):
    """A DeepSeek-style router (sigmoid scores, an expert bias in the choice) stated with gw.Router."""

    def __init__(self, e: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_DIM, e)
        self.register_buffer("bias", torch.linspace(-0.1, 0.1, e))
        self.spec = gw.Router("sigmoid", 2, bias="bias")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(x)
        idx = self.spec.choose(self, logits.detach())
        return logits, self.spec.weights_of(logits, idx), idx


class RoutedMoE(nn.Module):
    def __init__(self, e: int = 4) -> None:
        super().__init__()
        self.router = SigmoidRouter(e)
        self.experts = nn.ModuleList(nn.Linear(IN_DIM, 3) for _ in range(e))
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _, weights, idx = self.router(x)
        mixed = sum((weights * (idx == j)).sum(-1, keepdim=True) * expert(x) for j, expert in enumerate(self.experts))
        return [self.heads[t](mixed).squeeze(-1) for t in TASKS]


class CheckpointedMMoE(MMoE):
    """An MMoE whose forward runs under activation checkpointing (recomputed during the backward)."""

    reentrant = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.reentrant:
            x = x.detach().requires_grad_()  # reentrant checkpointing needs an input that requires grad
        return list(checkpoint(lambda t: tuple(super(CheckpointedMMoE, self).forward(t)), x,
                               use_reentrant=self.reentrant))


def mmoe(reentrant: bool | None = None) -> MMoE:
    """The kit's MMoE; ``reentrant`` not None: its forward runs under (that kind of) activation checkpointing."""
    torch.manual_seed(0)
    model = MMoE if reentrant is None else CheckpointedMMoE
    out = model(in_dim=IN_DIM, tasks=TASKS, n_experts=3, expert_hidden=(4,), expert_dim=3, tower_hidden=(2,))
    out.reentrant = bool(reentrant)
    return out


def routed() -> RoutedMoE:
    torch.manual_seed(0)
    return RoutedMoE()


def built() -> list[str]:
    return [name for name in registry.QUANTITIES if name not in NO_CAPTURE]


def model_for(name: str) -> nn.Module:
    return routed() if name in ROUTED else mmoe()


def watch_of(model: nn.Module, log_dir: Path, **kw: Any) -> gw.GateWatch:
    gates = {"router": gw.Gate("router", router=model.router.spec)} if isinstance(model, RoutedMoE) else None
    known = quantity_keywords()  # the options of the registered quantities only
    options = {k: v for k, v in (ROUTED_OPTIONS if isinstance(model, RoutedMoE) else OPTIONS).items() if k in known}
    settings = {"every": 1, "flush_every": 1000, "flush_secs": None, "tensorboard": False, **options, **kw}
    return gw.GateWatch(model, tasks=TASKS, gates=gates, log_dir=log_dir, **settings)


def batches(steps: int, n: int = N, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, IN_DIM, generator=g), torch.randn(n, generator=g)) for _ in range(steps)]


def train(model: nn.Module, watch: gw.GateWatch, data: list[tuple[torch.Tensor, torch.Tensor]], *,
          reduction: str = "mean", after: Callable[[int], None] = lambda step: None) -> None:
    """Forward, backward and step without an optimizer: the model stays as it is (copies stay equal)."""
    for step, (x, y) in enumerate(data, start=1):
        if "sample_groups" in {k for q in watch.quantities for k in q.batch_keys}:
            watch.grouped(torch.arange(len(x)) % 2)  # the labels stand until the next call
        out = model(x)
        watch.backward({t: nn.functional.mse_loss(o, y if i == 0 else -y, reduction=reduction)
                        for i, (t, o) in enumerate(zip(TASKS, out, strict=True))})
        model.zero_grad()
        watch.step()
        after(step)


def tables_of(name: str, log_dir: Path) -> dict[str, pd.DataFrame]:
    """The run's tables that quantity ``name`` writes (its read half's declared tables), events left out."""
    run = gw.load_run(log_dir)
    read = registry.read_halves()[registry.QUANTITIES.index(name)]
    return {t: run.table(t) for t in read.QUANTITY.tables if t != "events"}


def the(watch: gw.GateWatch, name: str) -> Quantity:
    q = watch.quantity(name)
    assert q is not None, f"{name} is not active on its kit model"
    return q


def test_the_kit_models_make_every_registered_quantity_active(tmp_path: Path) -> None:
    seen = set()
    for i, model in enumerate([mmoe(), routed()]):
        with watch_of(model, tmp_path / str(i)) as watch:
            seen |= {name for name in registry.QUANTITIES if watch.quantity(name) is not None}
    assert seen == set(built())
    assert not {name for name in NO_CAPTURE if name in seen}


@pytest.mark.parametrize("name", built())
@pytest.mark.slow
def test_an_empty_flush_collects_and_writes_nothing(name: str, tmp_path: Path) -> None:
    watch = watch_of(model_for(name), tmp_path)
    states = watch.reducer.collect([])[the(watch, name).name]
    assert all(s.tensor.shape[0] == 0 for s in states.values() if s.reduction in WINDOW_REDUCTIONS)
    watch.flush()
    watch.flush()
    watch.close()
    assert all(len(df) == 0 for df in tables_of(name, tmp_path).values())
    assert name in gw.load_run(tmp_path).meta["quantities"]


@pytest.mark.parametrize("name", built())
@pytest.mark.slow
def test_a_flush_with_no_closed_window_loses_and_changes_nothing(name: str, tmp_path: Path) -> None:
    """every=5 over 3 steps: a flush after step 2 has no closed window; the run equals one without that flush."""
    data = batches(3)
    runs = {}
    for mid in (False, True):
        model, folder = model_for(name), tmp_path / str(mid)
        watch = watch_of(model, folder, every=5)
        if mid:
            def flush_after_two(step: int, watch: gw.GateWatch = watch) -> None:
                if step == 2:
                    assert watch._windows == []
                    watch.flush()

            train(model, watch, data, after=flush_after_two)
        else:
            train(model, watch, data)
        watch.close()
        runs[mid] = tables_of(name, folder)
    assert any(len(df) for df in runs[False].values()) or name == "guard"  # the guard writes events only
    for table, df in runs[False].items():
        pd.testing.assert_frame_equal(runs[True][table], df, check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("name", built())
@pytest.mark.slow
def test_a_ddp_style_reduce_of_two_ranks_equals_the_whole_batch(name: str, tmp_path: Path) -> None:
    """Two watches fed the two halves of each batch ("ranks"), their states reduced with the reducer's own
    combine(), give the rows of one watch fed the whole batch; a quantity whose states are all REPLICATED (each
    rank measures its own batch, rank 0's figures are written) gives rank 0's rows."""
    data = batches(3, n=2 * N)
    halves = [[(x[:N], y[:N]) for x, y in data], [(x[N:], y[N:]) for x, y in data]]
    model = model_for(name)
    ranks = [watch_of(copy.deepcopy(model), tmp_path / f"rank{r}") for r in range(2)]
    q0 = the(ranks[0], name)
    replicated = all(kind is Reduction.REPLICATED for kind in q0.states.values())
    whole_data = halves[0] if replicated else data
    # per-sample gradients must not depend on the batch size for the proxy's sums to add up over ranks: sum losses
    # (the losses quantity averages calls, so it keeps mean losses)
    reduction = "mean" if name == "losses" else "sum"
    for watch, part in zip(ranks, halves, strict=True):
        train(watch.model, watch, part, reduction=reduction)
    whole = watch_of(copy.deepcopy(model), tmp_path / "whole")
    train(whole.model, whole, whole_data, reduction=reduction)
    windows = [1, 2, 3]
    states = [w.reducer.collect(windows)[q0.name] for w in ranks]
    assert set(states[0]) == set(states[1]) and set(states[0]) <= set(q0.states)
    reduced = {key: combine(s.reduction, [np.asarray(st[key].tensor.detach().double().cpu()) for st in states])
               for key, s in states[0].items()}
    host_whole = whole.reducer.reduce(windows)[0].get(q0.name, {})
    assert set(reduced) == set(host_whole)
    got, want = q0.rows(windows, reduced), the(whole, name).rows(windows, host_whole)
    assert set(got) == set(want)
    for table in want:
        a, b = (v if isinstance(v, pd.DataFrame) else pd.DataFrame(v) for v in (got[table], want[table]))
        if name == "groups":  # the baseline's labels are random draws: each rank draws its own rows' labels
            a, b = (df.drop(columns=["baseline"], errors="ignore") for df in (a, b))
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    if name != "guard":
        assert any(len(v) for v in want.values()), "nothing to compare"
    for w in [*ranks, whole]:
        w.close()


def hooks_of(module: nn.Module) -> dict[str, int]:
    return {kind: len(getattr(module, kind)) for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                          "_forward_hooks_with_kwargs", "_backward_pre_hooks")}


@pytest.mark.parametrize("name", built())
@pytest.mark.slow
def test_detach_leaves_no_hook_on_any_module(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantity alone (with the gate statistics, which map the experts it may need), trained, then detached:
    no module keeps a hook; the same with every quantity at close."""
    model = model_for(name)
    for only in ([*dict.fromkeys(["gates", name])], None):
        if only is not None:
            monkeypatch.setattr(registry, "QUANTITIES", only)
        watch = watch_of(model, tmp_path / str(only is None))
        train(model, watch, batches(3))
        assert any(sum(hooks_of(m).values()) for m in model.modules())
        if only is not None:
            for q in watch.quantities:
                q.detach()
        assert only is None or all(not sum(hooks_of(m).values()) for m in model.modules())
        watch.close()
        monkeypatch.undo()
        assert all(not sum(hooks_of(m).values()) for m in model.modules())


@pytest.mark.parametrize("make", [mmoe, routed])
def test_one_forward_hook_per_gate_module(make: Callable[[], nn.Module], tmp_path: Path) -> None:
    """Every quantity that reads a gate listens to it through one shared PyTorch hook; other modules (towers,
    experts on a similarity step) get at most one of each kind too."""
    model = make()
    watch = watch_of(model, tmp_path)
    train(model, watch, batches(2))  # similarity hooks the experts for step 3
    listeners = [q for q in watch.quantities if q.name in ("gates", "routers", "proxy")]
    assert len(listeners) >= 2
    for gate in watch.gates:
        assert hooks_of(gate.module)["_forward_hooks"] == 1
    assert all(n <= 1 for m in model.modules() for n in hooks_of(m).values())
    watch.close()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.slow
def test_activation_checkpointing_counts_each_forward_once(reentrant: bool, tmp_path: Path) -> None:
    """A forward recomputed during the backward is not measured again: every table equals the plain run's."""
    options = dict(OPTIONS)
    if reentrant:  # reentrant checkpointing runs the first forward without grad and supports no autograd.grad
        options.update(conflict_every=0, conflict_proxy=False)
    tables = {}
    for wrapped in (False, True):
        model = mmoe(reentrant if wrapped else None)
        folder = tmp_path / str(wrapped)
        watch = gw.GateWatch(model, tasks=TASKS, log_dir=folder, every=1, flush_every=1000, flush_secs=None,
                             tensorboard=False, **options)
        train(model, watch, batches(3))
        watch.close()
        run = gw.load_run(folder)
        tables[wrapped] = {t: run.table(t) for t in ("gates", "shares", "losses", "conflict", "conflict_proxy",
                                                     "similarity")}
    assert len(tables[False]["gates"]) == 3 * len(TASKS) and len(tables[False]["similarity"])
    assert (tables[False]["gates"]["samples"] == N).all()
    if not reentrant:
        assert len(tables[False]["conflict"]) and len(tables[False]["conflict_proxy"])
    for name, df in tables[False].items():
        pd.testing.assert_frame_equal(tables[True][name], df, check_exact=False, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the batch context, with a toy quantity
GROUPS = 3


class GroupCounts(Quantity):
    """Per window, the samples of each group (``watch.batch(sample_groups=...)``) seen by gate 0 in the forward and
    in the backward (through a gradient hook on its output)."""

    name = "group_counts"
    batch_keys = ("sample_groups",)

    def __init__(self, ctx: CaptureContext) -> None:
        self.ctx, self.groups = ctx, None
        self.add_state("forward", Reduction.SUM)
        self.add_state("backward", Reduction.SUM)
        self.buffer = WindowBuffer(self, ctx, self._reduce)
        self.host: list[dict[str, np.ndarray]] = []
        self.hook_gate(ctx.gates[0], self._seen)

    def on_batch(self, inputs: Any) -> None:
        self.groups = inputs.get("sample_groups")

    def _seen(self, call: HookCall) -> None:
        self.buffer.hold(("forward", self.groups))
        output = call.output
        if output.requires_grad:
            output.register_hook(lambda grad: self.buffer.hold(("backward", self.groups)))

    @staticmethod
    def _reduce(held: list[tuple[int, int, Any]]) -> list[tuple[str, list[int], torch.Tensor]]:
        return [(key, [slot], torch.bincount(groups, minlength=GROUPS).double()) for slot, _, (key, groups) in held]

    def on_window(self, step: int) -> None:
        self.buffer.on_window(step)

    def collect(self, windows: list[int]) -> dict[str, torch.Tensor]:
        return self.buffer.collect(len(windows))

    def rows(self, windows: list[int], host: dict[str, np.ndarray]) -> dict[str, Any]:
        self.host.append(host)
        return {}


@pytest.fixture
def group_counts(monkeypatch: pytest.MonkeyPatch) -> str:
    """The toy quantity as a package of its own (in sys.modules), registered the documented way."""
    name = "kit_toy.group_counts"
    top, package, capture, read = (types.ModuleType(n) for n in ("kit_toy", name, f"{name}.capture", f"{name}.read"))
    capture.KEYWORDS, capture.build = {}, GroupCounts  # type: ignore[attr-defined]
    read.QUANTITY = ReadHalf()  # type: ignore[attr-defined]
    for module in (top, package, capture, read):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "QUANTITIES", list(registry.QUANTITIES))
    registry.register(name)
    return name


@pytest.mark.parametrize("reentrant", [None, False])
def test_the_batch_context_reaches_the_quantities_that_read_it(group_counts: str, tmp_path: Path,
                                                               reentrant: bool | None) -> None:
    model = mmoe(reentrant)
    watch = gw.GateWatch(model, tasks=TASKS, log_dir=tmp_path, every=2, flush_every=1000, flush_secs=None,
                         tensorboard=False)
    toy = watch.quantity(group_counts)
    assert isinstance(toy, GroupCounts) and getattr(watch, group_counts) is toy
    with pytest.raises(TypeError, match=r"\['sample_group'\].*\['sample_groups'\]"):
        watch.batch(sample_group=torch.zeros(N, dtype=torch.long))
    g = torch.Generator().manual_seed(3)
    want = np.zeros((2, GROUPS))
    for step, (x, y) in enumerate(batches(4), start=1):
        labels = torch.randint(0, GROUPS, (N,), generator=g)
        want[(step - 1) // 2] += np.bincount(labels.numpy(), minlength=GROUPS)
        with watch.batch(sample_groups=labels):
            out = model(x)
        watch.backward({t: o.pow(2).mean() + 0 * y.sum() for t, o in zip(TASKS, out, strict=True)})  # after the block
        watch.step()
    watch.close()
    (host,) = toy.host[:1]
    np.testing.assert_array_equal(host["forward"], want)
    np.testing.assert_array_equal(host["backward"], want)  # the context outlives the block, through the backward
    assert group_counts in gw.load_run(tmp_path).meta["quantities"]
