"""GateWatch on a real model: training is unchanged, hooks go away, statistics stay on the device."""

from __future__ import annotations

import gc
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import batch, task_losses, tiny_mmoe, train
from torch import nn

import gatewatch as gw

TASKS = ["ctr", "like"]


def watch_of(model: nn.Module, log_dir, **kw) -> gw.GateWatch:
    kw.setdefault("tensorboard", False)
    return gw.GateWatch(model, tasks=TASKS, log_dir=log_dir, **kw)


def all_hooks(model: nn.Module) -> dict[str, tuple]:
    """Every hook dict of every module, copied (order kept)."""
    return {
        name: tuple(dict(getattr(m, attr)) for attr in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
            "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_hooks",
        ))
        for name, m in model.named_modules()
    }


def np_softmax(z: list[float]) -> np.ndarray:
    e = np.exp(np.asarray(z) - max(z))
    return e / e.sum()


# ---------------------------------------------------------------- training is untouched
@pytest.mark.slow
@pytest.mark.parametrize("use_backward", [True, False])
def test_training_is_exactly_as_without_gatewatch(tmp_path, use_backward: bool) -> None:
    plain = train(tiny_mmoe(), None, 30)
    watched_model = tiny_mmoe()
    with watch_of(watched_model, tmp_path, every=4, flush_every=8) as watch:
        train(watched_model, watch, 30, use_backward=use_backward)
    for (name, a), b in zip(plain.state_dict().items(), watched_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert len(gw.load_run(tmp_path).gates) == 2 * 8  # windows at steps 4, 8, ..., 28, 30


def test_log_losses_returns_the_sum_and_records_window_means(tmp_path) -> None:
    model = tiny_mmoe()
    watch = watch_of(model, tmp_path, every=2)
    logged = []
    for step in range(4):
        x, y = batch(step)
        losses = task_losses(model(x), y, TASKS)
        total = watch.log_losses(losses)
        assert total.requires_grad and torch.equal(total, losses["ctr"] + losses["like"])
        logged.append([float(losses[t].detach()) for t in TASKS])
        watch.step()
    watch.close()
    got = gw.load_run(tmp_path).losses.pivot(index="step", columns="task", values="loss")[TASKS].to_numpy()
    np.testing.assert_allclose(got, np.asarray(logged).reshape(2, 2, 2).mean(1), rtol=1e-6)


def test_losses_logged_without_step_are_folded_early_and_kept_exact(tmp_path, monkeypatch) -> None:
    """Past FOLD_CALLS calls in one window the held losses are reduced early; means and the first NaN step stay
    exact, whatever each loss's shape ([] or [1]) and dtype."""
    from gatewatch.quantities.losses import capture

    monkeypatch.setattr(capture, "FOLD_CALLS", 3)
    rng = np.random.default_rng(0)
    values = rng.random((11, 2))
    values[7, 1] = np.nan  # a NaN 'like' loss in the third folded block of the first window
    watch = watch_of(tiny_mmoe(), tmp_path, every=1)
    for i, (ctr, like) in enumerate(values):
        watch.log_losses({"ctr": torch.tensor([ctr], dtype=torch.float64),
                          "like": torch.tensor(like, dtype=torch.bfloat16)})
        if i in (8, 10):  # windows of 9 calls (three folds) and 2 calls (none)
            watch.step()
    watch.close()
    run = gw.load_run(tmp_path)
    got = run.losses.pivot(index="step", columns="task", values="loss")[TASKS].to_numpy()
    like = torch.tensor(values[:, 1], dtype=torch.bfloat16).double().numpy()
    np.testing.assert_allclose(got[:, 0], [values[:9, 0].mean(), values[9:, 0].mean()], rtol=1e-6)
    assert np.isnan(got[0, 1])
    np.testing.assert_allclose(got[1, 1], like[9:].mean(), rtol=1e-6)
    assert run.events[["step", "kind", "source"]].values.tolist() == [[1, "nonfinite_loss", "like"]]


def test_a_loss_that_is_a_view_into_a_large_tensor_is_held_as_a_copy() -> None:
    """Holding a loss until the flush must not keep alive the large tensor it is a view of."""
    from gatewatch.quantities.losses.capture import _held

    per_sample = torch.rand(100_000, requires_grad=True)
    view = per_sample[7]
    held = _held(view)
    assert held.untyped_storage().nbytes() == 4 and held.item() == view.item() and not held.requires_grad
    scalar = per_sample.mean()
    assert _held(scalar).data_ptr() == scalar.data_ptr()  # a loss of its own: no copy


def test_losses_must_name_every_task(tmp_path) -> None:
    watch = watch_of(tiny_mmoe(), tmp_path)
    with pytest.raises(ValueError, match="keyed by the task names"):
        watch.log_losses({"ctr": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="pass one per task"):
        watch.log_losses([torch.tensor(1.0)])
    with pytest.raises(ValueError, match=r"task 'like' is \(4,\), not a scalar tensor.*loss\.mean\(\)"):
        watch.log_losses({"ctr": torch.tensor(1.0), "like": torch.ones(4)})
    with pytest.raises(ValueError, match="task 'ctr' is float"):
        watch.log_losses({"ctr": 1.0, "like": torch.tensor(1.0)})
    watch.close()


# ---------------------------------------------------------------- hooks
def test_close_removes_every_hook_and_leaves_the_model_as_it_was(tmp_path) -> None:
    model = tiny_mmoe()
    model.gates["ctr"].register_forward_hook(lambda *_: None)  # a hook of the user's own stays
    before = all_hooks(model)
    x = batch(0)[0]
    expected = [o.detach() for o in model(x)]
    watch = watch_of(model, tmp_path)
    assert all_hooks(model) != before
    train(model, watch, 3, lr=0.0)
    watch.close()
    watch.close()  # idempotent
    assert all_hooks(model) == before
    for a, b in zip(model(x), expected, strict=True):
        assert torch.equal(a.detach(), b)
    with pytest.raises(RuntimeError, match="closed"):
        watch.step()
    assert gw.load_run(tmp_path).status == "finished"


def test_context_manager_records_a_crash(tmp_path) -> None:
    model = tiny_mmoe()
    with pytest.raises(ZeroDivisionError), watch_of(model, tmp_path, every=2) as watch:
        train(model, watch, 3)
        raise ZeroDivisionError("boom")
    run = gw.load_run(tmp_path)
    assert run.meta["status"] == "crashed" and "ZeroDivisionError: boom" in run.error
    assert run.status == "cut off" and run.steps == 3 and run.gates["step"].max() == 3


def test_eval_forwards_are_not_captured(tmp_path) -> None:
    model = tiny_mmoe()
    watch = watch_of(model, tmp_path, every=1)
    model(torch.randn(10, 12))
    model.eval()
    model(torch.randn(99, 12))
    watch.step()
    watch.close()
    assert gw.load_run(tmp_path).gates["samples"].tolist() == [10.0, 10.0]


@pytest.mark.slow
def test_forwards_without_step_stay_bounded(tmp_path) -> None:
    model = tiny_mmoe()
    watch = watch_of(model, tmp_path, every=1)
    for _ in range(500):
        model(torch.randn(4, 12))
        assert len(gate_statistics(watch).buffer.held) <= 64 * 2 + 1
    watch.step()
    watch.close()
    assert gw.load_run(tmp_path).gates["samples"].tolist() == [2000.0, 2000.0]


@pytest.mark.slow
def test_gate_outputs_folded_before_the_flush_give_the_tables_of_one_fold(tmp_path, monkeypatch) -> None:
    """Held gate outputs are folded once ``HOLD_ELEMENTS`` weights are held: the flush then folds only the last
    steps, and the tables are those of folding everything at the flush."""
    from gatewatch.quantities.gates import capture

    runs = {}
    for cap in (10**9, 64 * 4 * 5):  # at the flush only; every 3 steps (two gates of [64, 4] a step)
        monkeypatch.setattr(capture, "HOLD_ELEMENTS", cap)
        model = tiny_mmoe()
        watch = watch_of(model, tmp_path / str(cap), every=2, flush_every=10)
        held = []
        for _ in range(12):
            train(model, watch, 1, n=64)
            held.append(sum(p.numel() for *_, (_, p) in gate_statistics(watch).buffer.held))
        watch.close()
        runs[cap] = gw.load_run(tmp_path / str(cap))
        assert max(held) <= min(cap, 64 * 4 * 2 * 12)
    assert runs[64 * 4 * 5].steps == 12 and len(runs[64 * 4 * 5].gates) == 2 * 6
    for table in ("gates", "hist", "shares"):
        pd.testing.assert_frame_equal(runs[10**9].table(table), runs[64 * 4 * 5].table(table), rtol=1e-6)


def gate_statistics(watch: gw.GateWatch):  # type: ignore[no-untyped-def]
    return next(q for q in watch.quantities if q.name == "gates")


# ---------------------------------------------------------------- statistics
def test_forced_gates_give_exact_shares_utilization_and_drift(tmp_path) -> None:
    model = tiny_mmoe()
    model.force_gate("ctr", [2.0, 0.0, 0.0, 0.0])
    model.force_gate("like", [0.0, 0.0, 1.0, 3.0])
    watch = watch_of(model, tmp_path, every=5)
    train(model, watch, 10)
    model.force_gate("like", [3.0, 0.0, 0.0, 0.0])
    train(model, watch, 5)
    watch.close()
    run = gw.load_run(tmp_path)
    sh = run.shares.pivot_table(index=["step", "gate"], columns="expert", values="share")
    ctr, like_before, like_after = np_softmax([2, 0, 0, 0]), np_softmax([0, 0, 1, 3]), np_softmax([3, 0, 0, 0])
    np.testing.assert_allclose(sh.loc[(5, "ctr")], ctr, rtol=1e-6)
    np.testing.assert_allclose(sh.loc[(15, "like")], like_after, rtol=1e-6)
    ex = run.experts[run.experts["step"] == 10].set_index("expert")
    np.testing.assert_allclose(ex["utilization"].to_numpy(), (ctr + like_before) / 2, rtol=1e-6)
    assert ex["reference"].tolist() == [0.25] * 4 and ex["gates"].tolist() == [2] * 4
    drift = run.gates.set_index(["step", "gate"])["drift"]
    assert math.isnan(drift[(5, "like")]) and drift[(10, "like")] == pytest.approx(0, abs=1e-7)
    m = (like_before + like_after) / 2
    js = (np.sum(like_before * np.log(like_before / m)) + np.sum(like_after * np.log(like_after / m))) / 2 / np.log(2)
    assert drift[(15, "like")] == pytest.approx(js, rel=1e-5)
    g = run.gates.set_index(["step", "gate"])
    assert g.loc[(10, "ctr"), "spread"] < 1e-3 and g.loc[(10, "ctr"), "mutual_info"] < 1e-6


@pytest.mark.filterwarnings("ignore:gatewatch.*NaN/Inf:RuntimeWarning")
def test_first_nonfinite_step_and_event(tmp_path) -> None:
    model = tiny_mmoe()
    watch = watch_of(model, tmp_path, every=4)
    for step in range(1, 13):
        x = batch(step)[0]
        if step in (6, 11):
            x[2, :] = float("nan")  # one sample -> NaN gate row (and NaN expert outputs)
        with torch.no_grad():
            model(x)
        watch.step()
    watch.close()
    run = gw.load_run(tmp_path)
    ctr = run.gates[run.gates["gate"] == "ctr"].set_index("step")
    assert ctr["nonfinite"].tolist() == [0, 1, 1]
    assert ctr["samples"].tolist() == [4 * 64, 4 * 64 - 1, 4 * 64 - 1]
    assert ctr["first_nonfinite_step"].tolist() == [pd.NA, 6, 11]
    events = run.events[run.events["kind"] == "nonfinite"]
    assert sorted(events["source"]) == TASKS and events["step"].tolist() == [6, 6]  # reported once per gate


def test_windows_close_every_n_steps_and_at_close(tmp_path) -> None:
    model = tiny_mmoe()
    watch = watch_of(model, tmp_path, every=10, flush_every=20)
    train(model, watch, 25, n=16)
    watch.writes.drain()  # the flush of step 20 is written by the writer thread
    assert sorted(set(gw.load_run(tmp_path).gates["step"])) == [10, 20]  # 25 is not flushed yet
    watch.close()
    run = gw.load_run(tmp_path)
    ctr = run.gates[run.gates["gate"] == "ctr"]
    assert ctr["step"].tolist() == [10, 20, 25] and ctr["samples"].tolist() == [160.0, 160.0, 80.0]
    assert run.steps == 25 and run.meta["config"]["every"] == 10


# ---------------------------------------------------------------- on device, bounded
SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def test_no_host_sync_between_flushes(tmp_path, monkeypatch) -> None:
    """Between flushes the watch never reads a tensor value on the host (each would be a sync on GPU)."""
    model = tiny_mmoe()
    watch = watch_of(model, tmp_path, every=3, flush_every=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, watch, 1)  # the first output of each gate is checked once, on the host

    def forbidden(*_args, **_kw):
        raise AssertionError("host sync on the hot path")

    for step in range(1, 10):
        x, y = batch(step)
        with monkeypatch.context() as m:
            for name in SYNCING:
                m.setattr(torch.Tensor, name, forbidden)
            watch.backward(task_losses(model(x), y, TASKS))
            watch.step()
        opt.step()
        opt.zero_grad()
    assert len(watch._windows) == 3
    watch.close()
    assert len(gw.load_run(tmp_path).gates) == 2 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_sync_between_flushes(tmp_path) -> None:
    """On a GPU, CUDA's own sync detector sees no synchronising call from capture, windows or losses."""
    model = tiny_mmoe().cuda()
    watch = watch_of(model, tmp_path, every=3, flush_every=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [tuple(t.cuda() for t in batch(step)) for step in range(10)]
    for step, (x, y) in enumerate(batches):
        torch.cuda.set_sync_debug_mode("error" if step > 0 else "default")  # step 0 checks each gate once
        try:
            watch.backward(task_losses(model(x), y, TASKS))
            watch.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.step()
        opt.zero_grad()
    watch.close()
    run = gw.load_run(tmp_path)
    assert run.gates["samples"].sum() == 2 * 10 * 64 and run.losses["step"].tolist() == [3, 3, 6, 6, 9, 9, 10, 10]


@pytest.mark.slow
def test_memory_stays_constant_over_a_run(tmp_path) -> None:
    model = tiny_mmoe()
    watch = watch_of(model, tmp_path, every=10, flush_every=50)
    counts, shapes = [], []
    stats = gate_statistics(watch)
    for _ in range(3):
        train(model, watch, 100, n=16)
        gc.collect()
        counts.append(sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()))
        assert stats.buffer.held == [] and watch._windows == []
        shapes.append(sorted(tuple(t.shape) for t in stats.buffer.sums.values()))
    assert counts[1] == counts[2], counts
    assert shapes[0] == shapes[1] == shapes[2], shapes
    watch.close()


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"flush_every": 2.5}, "flush_every must be a positive integer"),
        ({"threshold": 1.5}, "threshold is a gate weight"),
        ({"tasks": ["a", "a"]}, "tasks must be distinct"),
    ],
)
def test_bad_arguments_fail_early(tmp_path, kwargs: dict, match: str) -> None:
    kwargs = {"tasks": TASKS, "log_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=match):
        gw.GateWatch(tiny_mmoe(), **kwargs)
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        gw.GateWatch(lambda x: x, log_dir=tmp_path)  # type: ignore[arg-type]
