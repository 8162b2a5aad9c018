"""Cost of watching sparse routers on a small transformers MoE on the CPU, and memory at 32k tokens x 128 experts.

1. In one process, interleaved in blocks, an unmonitored training step of a tiny transformers model (built from a
   config: hidden 64, 4 layers, 8 experts, top-2, batch 2 x 64 tokens) against the same step under a zero-config
   ``GateWatch`` (affinity statistics + dispatch, every 10 steps, flushes every 100). Prints the median and mean
   ratios for a softmax router (Qwen3-MoE) and a sigmoid router with bias and groups (DeepSeek-V3).
   Target: at most 1.02x. Then, for a figure that machine noise hurts less, the hooks' per-step work on one
   step's router outputs and the flush's batched dispatch sums, timed alternately with plain steps, as shares
   of a plain step.
2. One router forward of 32,768 tokens x 128 experts (top-8, sigmoid, 8 groups) per step under the watch, for
   ``--big-steps`` steps: the state the watch holds between flushes (bytes) after every step, and the growth
   of the peak resident memory after step 5. The dispatch state is one ``3E + 5`` vector per router and window;
   the affinity outputs and the router outputs waiting for the dispatch sums are capped (``HOLD_ELEMENTS``),
   so all of it stays flat.

3. ``--coactivation``: instead of 1 and 2, the cost of the ``coactivation`` quantity alone: on the same two
   models, interleaved, the watched step with co-activation (the default) against the watched step with
   ``coactivation=False``, and both against the plain step. Target: at most 1.01x (median) for co-activation.

4. ``--probe``: the routing probe's forward (``saturation_every``): one probe of the first batch (eval mode,
   no_grad, the routers' choice copied) timed alternately with a plain training step; its cost per step is that
   ratio divided by ``saturation_every``.

    python benchmarks/bench_routers.py [--steps 600] [--threads 2] [--quick] [--coactivation] [--probe]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved, ratio_report, setup

import gatewatch as gw


def tiny(family: str) -> torch.nn.Module:
    import transformers as tf

    common = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
              "num_experts_per_tok": 2, "moe_intermediate_size": 64}
    torch.manual_seed(0)
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, num_experts=8, norm_topk_prob=True)
    else:
        config = tf.DeepseekV3Config(**common, n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=1,
                                     first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                     qk_nope_head_dim=8, v_head_dim=16)
    model = tf.AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(p, std=0.3)
    if family == "deepseek_v3":
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return model.train()


def step_fn(model: torch.nn.Module, watch: gw.GateWatch | None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 64), generator=g) for _ in range(4)]
    count = [0]

    def step() -> None:
        ids = batches[count[0] % len(batches)]
        count[0] += 1
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if watch is not None:
            watch.step()

    return step


def hook_share(family: str, steps: int) -> str:
    """The hooks' work per step (the affinity, and the copy of each router's outputs) on one step's router outputs,
    timed alternately with plain steps, and the flush's batched dispatch sums of 100 such steps per step: their
    medians as shares of the plain step's median."""
    from gatewatch.gating.discovery import resolve
    from gatewatch.quantities.routers.dispatch import Held, window_sums

    model = tiny(family)
    gates = resolve(model, None, None)
    outs: list[tuple] = []
    handles = [g.module.register_forward_hook(lambda m, _i, o, g=g: outs.append((g, m, o))) for g in gates]
    plain = step_fn(model, None)
    plain()
    for h in handles:
        h.remove()
    captured = outs[-len(gates):]
    held = [(g, m, [Held.read(g.router, m, o, w // 10) for w in range(100)]) for g, m, o in captured]

    def hooks() -> None:
        for g, m, o in captured:
            g.to_probs(o)
            Held.read(g.router, m, o, 0)

    def fold() -> None:
        for g, m, passes in held:
            window_sums(g.router, m, passes, 0.05)

    times = interleaved({"plain": plain, "hooks": hooks, "fold": fold}, steps, block=5)
    med = {k: statistics.median(v) for k, v in times.items()}
    return (f"{family}: hook work per step {med['hooks'] * 1e3:.2f} ms = {med['hooks'] / med['plain']:.2%} of a "
            f"plain step ({med['plain'] * 1e3:.1f} ms); dispatch sums at the flush {med['fold'] * 1e3:.1f} ms per "
            f"100 steps = {med['fold'] / 100 / med['plain']:.2%} of a step")


def overhead(steps: int, root: Path) -> None:
    for family in ("qwen3_moe", "deepseek_v3"):
        print(hook_share(family, steps), flush=True)
        watch_model = tiny(family)
        watch = gw.GateWatch(watch_model, log_dir=root / family, tensorboard=False, every=10, flush_every=100,
                             flush_secs=None)
        fns = {"plain": step_fn(tiny(family), None), "watched": step_fn(watch_model, watch)}
        times = interleaved(fns, steps, block=10)
        watch.close()
        print(ratio_report(f"{family} ({len(watch.gates)} routers)", times["plain"], times["watched"]), flush=True)


SPEC = gw.Router("sigmoid", 8, bias="bias", groups=(8, 4), renormalize=True)


class BigRouter(torch.nn.Module):
    """A DeepSeek-style router over 128 experts (sigmoid, bias, 8 groups of 16, top 8 within 4 groups)."""

    def __init__(self, d: int = 64, e: int = 128) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d, e, bias=False)
        self.register_buffer("bias", torch.zeros(e))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(h)
        idx = SPEC.choose(self, logits.detach())
        return logits, SPEC.weights_of(logits, idx), idx


def memory(big_steps: int, root: Path) -> None:
    tokens, e = 32_768, 128
    model = BigRouter(e=e).train()
    gate = gw.Gate(model, router=SPEC)
    watch = gw.GateWatch(model, gates={"router": gate}, log_dir=root / "big", tensorboard=False, every=10,
                         flush_every=1000, flush_secs=None)
    gates_q = next(q for q in watch.quantities if q.name == "gates")
    routers_q = next(q for q in watch.quantities if q.name == "routers")
    h = torch.randn(tokens, 64)
    held = []
    rss = []
    for _ in range(big_steps):
        model(h)
        watch.step()
        held_gates = sum(p.numel() * p.element_size() for *_, (_, p) in gates_q.buffer.held) + sum(
            t.numel() * t.element_size() for t in gates_q.buffer.sums.values())
        held_routers = sum(t.numel() * t.element_size() for t in routers_q.buffer.sums.values())
        waiting = sum(t.numel() * t.element_size() for *_, (_, h) in routers_q.buffer.held
                      for t in (h.logits, h.idx, h.mask, h.weights, h.bias) if t is not None)
        held.append((held_gates, held_routers, waiting))
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    watch.close()
    grow = rss[-1] - rss[min(4, len(rss) - 1)]
    print(f"32,768 tokens x {e} experts, {big_steps} steps: held by the affinity statistics max "
          f"{max(g for g, _, _ in held) / 1e6:.1f} MB (after step 1: {held[0][0] / 1e6:.1f} MB), router outputs "
          f"waiting for the dispatch sums max {max(w for *_, w in held) / 1e6:.1f} MB, the dispatch sums max "
          f"{max(r for _, r, _ in held) / 1e3:.1f} kB; peak RSS {rss[-1]:.0f} MB, grew {grow:.0f} MB after step 5",
          flush=True)


def coactivation_cost(steps: int, root: Path) -> None:
    """The watched step with co-activation against the same watch without it, interleaved in one process."""
    for family in ("qwen3_moe", "deepseek_v3"):
        models = {"plain": tiny(family), "without": tiny(family), "with": tiny(family)}
        watches = {side: gw.GateWatch(models[side], log_dir=root / f"{family}-{side}", tensorboard=False, every=10,
                                      flush_every=100, flush_secs=None, coactivation=side == "with")
                   for side in ("without", "with")}
        fns = {side: step_fn(model, watches.get(side)) for side, model in models.items()}
        times = interleaved(fns, steps, block=10)
        for watch in watches.values():
            watch.close()
        print(ratio_report(f"{family}: co-activation on / off", times["without"], times["with"]), flush=True)
        print(ratio_report(f"{family}: watched with co-activation / plain", times["plain"], times["with"]),
              flush=True)


def probe_cost(steps: int, root: Path) -> None:
    """One routing probe against one plain training step, interleaved; the cost per step at saturation_every=N is
    their ratio / N."""
    for family in ("qwen3_moe", "deepseek_v3"):
        model = tiny(family)
        watch = gw.GateWatch(model, log_dir=root / f"{family}-probe", tensorboard=False, every=10, flush_every=100,
                             flush_secs=None, saturation_every=10**9)
        train = step_fn(model, watch)
        train()  # the first batch becomes the probe
        probing = watch.routing_stability
        times = interleaved({"plain": step_fn(tiny(family), None), "probe": probing.probe}, steps, block=5)
        watch.close()
        ratio = statistics.median(times["probe"]) / statistics.median(times["plain"])
        print(f"{family}: one probe {statistics.median(times['probe']) * 1e3:.1f} ms = {ratio:.2f} of a training step "
              f"({statistics.median(times['plain']) * 1e3:.1f} ms): {ratio / 100:.2%} per step at "
              f"saturation_every=100, {ratio / 1000:.3%} at 1000", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600,
                   help="timed steps per side (at 18-24 ms a step, 200 leave about 2%% of noise in the median)")
    p.add_argument("--big-steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--coactivation", action="store_true", help="time the co-activation quantity alone")
    p.add_argument("--probe", action="store_true", help="time the routing probe's forward")
    args = p.parse_args()
    setup(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.coactivation or args.probe:
            if args.coactivation:
                coactivation_cost(20 if args.quick else args.steps, Path(tmp))
            if args.probe:
                probe_cost(20 if args.quick else args.steps, Path(tmp))
            return
        overhead(20 if args.quick else args.steps, Path(tmp))
        memory(3 if args.quick else args.big_steps, Path(tmp))


if __name__ == "__main__":
    main()
