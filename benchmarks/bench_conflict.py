"""Cost of gradient-conflict measurement on a census-sized MMoE (input 499, 8 experts 256 -> 128, batch 1024).

For 2 and 4 tasks, plain and monitored training steps run in one process, interleaved in blocks, and
the ratios are printed for:

* ``conflict_every=1``: every step is a conflict step (median ratio = the cost of one conflict step);
  targets: at most 1.7x for 2 tasks, 1 + 0.6 (K - 1) for K tasks;
* ``conflict_every=50``: the cost over a run (mean ratio, conflict steps and flushes included); target
  at most 1.02x, against the gate-capture watch alone as well as against the plain step;
* for comparison, the naive method: one ``autograd.grad`` per task, then the ordinary backward;
* the floor: K-1 ``autograd.grad`` calls with the graph kept, then the ordinary backward (no statistics),
  and the conflict step against it (target at most 1.05x); and the same floor run under a watch without
  conflict logging (gate statistics on both sides), which isolates what the conflict measurement adds.

Then the cost of the reduction of one conflict step (``task_statistics``) on the census shapes.

``--ddp``: instead, the conflict step under DDP on 2 gloo processes (CPU, one thread each; census MMoE, 2 tasks, batch
1024 per rank), each side its own DDP model: the plain step, ``conflict_scope="applied"`` and ``"local"``, and the
floor of the applied scope - the local floor (K-1 ``autograd.grad`` with the graph kept, then the ordinary
backward, whose gradient DDP averages) plus the minimal communication: one ``all_reduce`` of the K-1 tasks' gradients
on the shared parameters (the last task's averaged gradient is then ``.grad`` minus theirs). Loopback gloo on one
machine's cores is not a cluster's network: the communication share there can be far lower or higher.

``--fused``: instead, the conflict step on fused experts (a transformers 5 Qwen3-MoE backbone, every expert
of a layer held in ``[E, ...]`` parameters and measured per expert slice) with two task heads, against the
plain step and its floor (one ``autograd.grad`` on the backbone, then the ordinary backward).

    python benchmarks/bench_conflict.py [--steps 300] [--block 50] [--threads 2] [--quick] [--per-step-only]
    python benchmarks/bench_conflict.py --fused [--experts 32] [--steps 100]
    python benchmarks/bench_conflict.py --ddp [--steps 100] [--block 10]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CENSUS_BATCH,
    CENSUS_SIZE,
    interleaved,
    interleaved_flush_secs,
    paired_ratio,
    ratio_report,
    setup,
    time_steps,
)

import gatewatch as gw
from gatewatch.models import MMoE
from gatewatch.quantities.conflict.maths import PURITY_BINS, SignSample, UnitRuns, stack_rows, task_statistics

AMORTISED_EVERY = 50


class FusedBackbone(nn.Module):
    """A Qwen3-MoE backbone (transformers 5, fused experts: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
    with one linear head per task on its last hidden state; ``forward(ids)`` returns the heads' outputs."""

    def __init__(self, tasks: list[str], experts: int) -> None:
        super().__init__()
        import transformers as tf

        torch.manual_seed(0)
        config = tf.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   vocab_size=256, max_position_embeddings=128, num_experts=experts,
                                   num_experts_per_tok=4, norm_topk_prob=True, use_cache=False)
        self.tasks = tasks
        self.backbone = tf.AutoModel.from_config(config)
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in tasks)

    def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:
        h = self.backbone(input_ids=ids).last_hidden_state.mean(1)
        return [head(h).squeeze(-1) for head in self.heads]


def fused_batches(k: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (8, 64), generator=g), torch.randint(0, 2, (8, k), generator=g).float())
            for _ in range(count)]


def mmoe(tasks: list[str]) -> MMoE:
    torch.manual_seed(0)
    return MMoE(tasks=tasks, **CENSUS_SIZE)


def batches(k: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(CENSUS_BATCH, CENSUS_SIZE["in_dim"], generator=g),
             torch.randint(0, 2, (CENSUS_BATCH, k), generator=g).float()) for _ in range(count)]


Backward = Callable[[dict[str, torch.Tensor]], None]


def step_fn(model: nn.Module, backward: Backward, after: Callable[[], None] = lambda: None) -> Callable[[], None]:
    """One Adam step per call; ``backward(losses)`` does the backward pass, ``after()`` runs after the update."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = (fused_batches if isinstance(model, FusedBackbone) else batches)(len(model.tasks))
    bce = nn.functional.binary_cross_entropy_with_logits
    count = [0]

    def step() -> None:
        x, y = data[count[0] % len(data)]
        count[0] += 1
        losses = {t: bce(out, y[:, i]) for i, (t, out) in enumerate(zip(model.tasks, model(x), strict=True))}
        backward(losses)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after()

    return step


def plain_step(model: nn.Module) -> Callable[[], None]:
    return step_fn(model, lambda losses: sum(losses.values()).backward())


def watched_step(model: nn.Module, watch: gw.GateWatch) -> Callable[[], None]:
    return step_fn(model, watch.backward, watch.step)


def grads_then_backward(model: nn.Module, every_task: bool, watch: gw.GateWatch | None = None) -> Callable[[], None]:
    """``autograd.grad`` on the experts (the fused backbone) for every task's loss (or all but the last), graph
    kept, then the ordinary backward of their sum (through ``watch`` if given, which then also gets
    ``watch.step()``)."""
    shared = list((model.backbone if isinstance(model, FusedBackbone) else model.experts).parameters())

    def backward(losses: dict[str, torch.Tensor]) -> None:
        values = list(losses.values())
        for loss in values if every_task else values[:-1]:
            torch.autograd.grad(loss, shared, retain_graph=True)
        if watch is None:
            sum(values).backward()
        else:
            watch.backward(losses)

    return step_fn(model, backward) if watch is None else step_fn(model, backward, watch.step)


def naive_step(model: nn.Module) -> Callable[[], None]:
    """One autograd.grad per task on the experts, then the ordinary backward (what gatewatch avoids)."""
    return grads_then_backward(model, every_task=True)


def floor_step(model: nn.Module, watch: gw.GateWatch | None = None) -> Callable[[], None]:
    """The floor of an exact conflict step: K-1 autograd.grad on the experts (graph kept), then the ordinary
    backward; no statistics. With ``watch`` (one that logs no conflict): the same floor under the gate capture
    of the conflict step's watch."""
    return grads_then_backward(model, every_task=False, watch=watch)


def applied_floor_step(model: nn.Module) -> Callable[[], None]:
    """The floor of an applied-scope conflict step under DDP (``model`` wrapped in it): K-1 autograd.grad on the
    experts (graph kept), one all_reduce of those K-1 gradients, then the ordinary backward; no statistics."""
    shared = list(model.module.experts.parameters())

    def backward(losses: dict[str, torch.Tensor]) -> None:
        values = list(losses.values())
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                for loss in values[:-1]]
        torch.distributed.all_reduce(torch.stack(rows))
        sum(values).backward()

    return step_fn(model, backward)


def ddp_compare(steps: int, block: int, log_root: Path) -> None:
    """The conflict step under DDP against the plain DDP step and the applied scope's floor (run on every rank;
    rank 0 prints)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    tasks = ["task0", "task1"]

    def wrapped() -> nn.Module:
        model = DDP(mmoe(tasks))
        model.tasks = tasks  # step_fn reads it
        return model

    def watched(scope: str) -> Callable[[], None]:
        model = wrapped()
        watch = gw.GateWatch(model, tasks=tasks, log_dir=log_root / f"ddp_{scope}", tensorboard=False,
                             flush_secs=interleaved_flush_secs(4), conflict_every=1, conflict_scope=scope)
        watches.append(watch)
        return watched_step(model, watch)

    watches: list[gw.GateWatch] = []
    times = interleaved({"plain": plain_step(wrapped()), "floor": applied_floor_step(wrapped()),
                         "applied": watched("applied"), "local": watched("local")}, steps=steps, block=block)
    for watch in watches:
        watch.close()
    if rank == 0:
        show("applied conflict step vs plain DDP step", times["plain"], times["applied"])
        show("  floor: K-1 autograd.grad + all_reduce of K-1 rows + backward, vs plain", times["plain"],
             times["floor"])
        show("applied conflict step vs its floor", times["floor"], times["applied"], block)
        show("local conflict step (no communication) vs plain", times["plain"], times["local"])
        show("applied vs local (what averaging the task gradients adds)", times["local"], times["applied"])
    dist.destroy_process_group()


def launch_ddp(argv: list[str]) -> None:
    """Run this script with ``argv`` on 2 ranks (RANK, WORLD_SIZE, MASTER_* set); wait for both."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, *argv], env={**env, "RANK": str(r)}) for r in range(2)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")


def show(label: str, base: list[float], monitored: list[float], block: int | None = None) -> None:
    """The ratio line; with ``block``, also the median over rounds of the per-round ratios, paired by round, with
    its 95% interval."""
    print(ratio_report(label, base, monitored), flush=True)
    if block is not None:
        median, low, high = paired_ratio(base, monitored, block)
        print(f"    paired by round ({min(len(base), len(monitored)) // block} rounds of blocks of {block}): "
              f"{median:.3f}x [{low:.3f}, {high:.3f}]", flush=True)


def compare(k: int, steps: int, block: int, log_root: Path, amortised: bool = True,
            make: Callable[[list[str]], nn.Module] | None = None) -> float:
    """Print the ratio lines for ``k`` tasks (on ``make(tasks)``, the census MMoE by default); return the median
    plain step (s)."""
    tasks = [f"task{i}" for i in range(k)]
    build = make or mmoe
    print(f"\n{k} tasks", flush=True)

    def watch(name: str, sides: int, **kwargs: int) -> tuple[nn.Module, gw.GateWatch]:
        model = build(tasks)
        return model, gw.GateWatch(model, tasks=tasks, log_dir=log_root / f"{k}_{name}", tensorboard=False,
                                   flush_secs=interleaved_flush_secs(sides), **kwargs)

    every_step, every_step_watch = watch("every1", 5, conflict_every=1)
    floor_model, floor_watch = watch("floor", 5)
    times = interleaved({"plain": plain_step(build(tasks)), "conflict": watched_step(every_step, every_step_watch),
                         "naive": naive_step(build(tasks)), "floor": floor_step(build(tasks)),
                         "floor+gates": floor_step(floor_model, floor_watch)},
                        steps=steps, block=block)
    every_step_watch.close()
    floor_watch.close()
    target = 1 + 0.6 * (k - 1) if k > 2 else 1.7
    show(f"conflict step (target {target:.1f}x)", times["plain"], times["conflict"])
    show("  naive: autograd.grad per task", times["plain"], times["naive"])
    show("  floor: K-1 autograd.grad + backward", times["plain"], times["floor"])
    show("conflict step vs its floor (target 1.05x)", times["floor"], times["conflict"], block)
    show("  the floor under a watch without conflict logging", times["floor"], times["floor+gates"])
    show("conflict step vs that watched floor (what conflict logging adds)", times["floor+gates"], times["conflict"])
    plain = statistics.median(times["plain"])
    if not amortised:
        return plain

    gates_model, gates_watch = watch("gates", 3)
    amortised_model, amortised_watch = watch("every50", 3, conflict_every=AMORTISED_EVERY)
    amortised_steps = max(steps, 4 * AMORTISED_EVERY)
    times = interleaved({"plain": plain_step(build(tasks)), "gates": watched_step(gates_model, gates_watch),
                         "amortised": watched_step(amortised_model, amortised_watch)},
                        steps=amortised_steps, block=AMORTISED_EVERY, warmup=AMORTISED_EVERY)  # past the probe
    gates_watch.close()
    amortised_watch.close()
    show(f"conflict_every={AMORTISED_EVERY} vs plain", times["plain"], times["amortised"])
    show(f"conflict_every={AMORTISED_EVERY} vs gate capture", times["gates"], times["amortised"])
    return plain


def reduction_cost(k: int, plain_s: float) -> None:
    """Median time of one conflict step's reduction on the census shapes."""
    model = mmoe([f"task{i}" for i in range(k)])
    shared = list(model.experts.parameters())
    bounds, start = [], 0
    for p in shared:
        bounds.append((start, start + p.numel()))
        start += p.numel()
    per_expert = len(shared) // CENSUS_SIZE["n_experts"]
    groups = [(bounds[i][0], bounds[i + per_expert - 1][1]) for i in range(0, len(shared), per_expert)]
    stack = torch.empty(stack_rows(k), start)
    g = torch.randn(k, start)
    stack[:k] = g
    sample = SignSample.plan(bounds, groups, k, stack)  # as the conflict step does: sign statistics on a sample
    plan = UnitRuns.plan(bounds)

    for label, chosen in (("signs on a 4,096-element sample per tensor", sample),
                          ("every element, refilling the buffer it overwrites", None)):
        def reduce(chosen: SignSample | None = chosen) -> None:
            if chosen is None:
                stack[:k] = g
            task_statistics(stack, k, bounds, groups, PURITY_BINS, chosen, plan)

        ms = statistics.median(time_steps(reduce, 30, warmup=3)) * 1e3
        print(f"  reduction of one conflict step ({k} tasks, {start} shared elements, {label}): {ms:.2f} ms = "
              f"{ms / 1e3 / plain_s:.1%} of a plain step", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per side and configuration")
    parser.add_argument("--block", type=int, default=25, help="steps per interleaved block (conflict_every=1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps")
    parser.add_argument("--per-step-only", action="store_true",
                        help="only the conflict step against the plain step and the floor (no conflict_every=50)")
    parser.add_argument("--fused", action="store_true", help="fused experts: a Qwen3-MoE backbone with two heads")
    parser.add_argument("--experts", type=int, default=32, help="experts per layer with --fused")
    parser.add_argument("--ddp", action="store_true", help="under DDP on 2 gloo processes (applied and local scope)")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else args.steps
    if args.ddp and "RANK" not in os.environ:
        launch_ddp(sys.argv[1:] if argv is None else argv)
        return
    setup(1 if args.ddp else args.threads)
    if args.ddp:
        if os.environ["RANK"] == "0":
            print(f"gradient conflict under DDP: census-sized MMoE, 2 tasks, batch {CENSUS_BATCH} per rank, 2 gloo "
                  f"ranks on this machine (loopback; not a cluster's network), 1 thread each, {steps} steps per "
                  f"side, torch {torch.__version__}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ddp_compare(steps, min(args.block, steps), Path(tmp))
        return
    if args.fused:
        print(f"gradient conflict on fused experts: Qwen3-MoE backbone, 2 layers, {args.experts} experts (top 4), "
              f"hidden 64, 8 x 64 tokens, 2 heads, {args.threads} threads, {steps} steps per side, torch "
              f"{torch.__version__}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            compare(2, steps, min(args.block, steps), Path(tmp), amortised=not args.per_step_only,
                    make=lambda tasks: FusedBackbone(tasks, args.experts))
        return
    print(f"gradient conflict overhead: census-sized MMoE, batch {CENSUS_BATCH}, {args.threads} threads, "
          f"{steps} steps per side, torch {torch.__version__}, denormals flushed", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for k in (2, 4):
            plain = compare(k, steps, min(args.block, steps), Path(tmp), amortised=not args.per_step_only)
            reduction_cost(k, plain)


if __name__ == "__main__":
    main()
