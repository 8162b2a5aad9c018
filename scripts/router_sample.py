"""The sparse-router sample run: a tiny transformers DeepSeek-V3 (built from a config, no download) trained on
synthetic Markov-chain text with aux-loss-free balancing (b += u * sign(mean load - load) after each step).

Layer 3's router starts strongly skewed towards one expert group, faster than the bias update can follow: it
stays imbalanced while its bias keeps growing. Used by ``scripts/make_sample_runs.py``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

import gatewatch as gw

NAME = "deepseek-routers"
SHOWS = ("tiny DeepSeek-V3 (3 MoE layers, 16 experts, top-2 of 4 groups, sigmoid scores, expert bias updated "
         "aux-loss-free at u=2e-4), synthetic text: layers 1-2 balance, layer 3 starts skewed and stays imbalanced "
         "while its bias grows")
EXPECT = frozenset({"router_imbalance", "router_bias_growing"})
STEPS, BATCH, SEQ, VOCAB, UPDATE = 400, 8, 32, 128, 2e-4


def model() -> torch.nn.Module:
    import transformers as tf

    config = tf.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
        n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=64)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config)


def text(generator: torch.Generator) -> torch.Tensor:
    """A batch of sequences from a fixed sparse Markov chain over the vocabulary."""
    chain = torch.Generator().manual_seed(1)
    nxt = torch.randint(0, VOCAB, (VOCAB, 4), generator=chain)
    ids = torch.empty(BATCH, SEQ, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=generator)
    for t in range(1, SEQ):
        ids[:, t] = nxt[ids[:, t - 1], torch.randint(0, 4, (BATCH,), generator=generator)]
    return ids


def make(out: Path) -> tuple[list[str], float]:
    """Train the run into ``out / NAME``; return its finding codes and the seconds it took."""
    started = time.perf_counter()
    shutil.rmtree(out / NAME, ignore_errors=True)
    torch.set_num_threads(1)
    net = model()
    routers = [m for m in net.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    with torch.no_grad():
        for m in routers:
            m.weight.normal_(0, 0.3)
        means: list[torch.Tensor] = []
        hook = routers[-1].register_forward_pre_hook(lambda _m, inp: means.append(
            inp[0].reshape(-1, inp[0].shape[-1]).mean(0)))
        net(input_ids=text(torch.Generator().manual_seed(0)))
        hook.remove()
        routers[-1].weight[:4] = 30 * means[0] / means[0].norm()  # group 0 gets most tokens at the start
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(2)
    loads: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda m, _i, o, i=i: loads.__setitem__(i, torch.bincount(
        o[2].reshape(-1), minlength=m.num_experts).float())) for i, m in enumerate(routers)]
    with gw.GateWatch(net, log_dir=out / NAME, every=10, flush_every=100, tensorboard=False, saturation_every=50,
                      config={"model": "DeepseekV3ForCausalLM (tiny)", "bias_update": UPDATE}) as watch:
        for _ in range(STEPS):
            ids = text(generator)
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():  # DeepSeek-V3's aux-loss-free balancing
                for i, m in enumerate(routers):
                    m.e_score_correction_bias += UPDATE * torch.sign(loads[i].mean() - loads[i])
            watch.step()
    for h in handles:
        h.remove()
    findings = sorted({f.code for f in gw.find(gw.load_run(out / NAME))})
    return findings, time.perf_counter() - started


if __name__ == "__main__":
    import sys

    codes, seconds = make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/router-sample"))
    print(f"{NAME}: {seconds:.0f}s, findings: {codes}")
