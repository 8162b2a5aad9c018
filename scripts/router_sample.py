"""The sparse-router sample run's model: a tiny transformers DeepSeek-V3 backbone (``gatewatch.models.SparseMoE``,
``family="deepseek_v3"``, built from a config, no download) with the flag and score towers, trained on the domains
token sequences with aux-loss-free balancing (b += u * sign(mean load - load) after each step, ``bias_update``).

Layer 3's router starts strongly skewed towards one expert group (:func:`skewed`), faster than the bias update can
follow: it stays imbalanced while its bias keeps growing. Used by ``scripts/make_sample_runs.py``; the run's
``model.json`` rebuilds the architecture (``SparseMoE`` with ``MODEL_KWARGS``) and ``checkpoint.pt`` holds the
trained weights, so the ablations run on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gatewatch.training.datasets import Splits
from gatewatch.training.loop import TrainConfig, build_model

NAME = "deepseek-routers"
SHOWS = ("tiny DeepSeek-V3 backbone (3 MoE layers, 16 experts, top-2 of 4 groups, sigmoid scores, a shared expert, "
         "expert bias updated aux-loss-free at u=5e-4) with a flag and a score tower, on the domains token sequences "
         "labelled by domain: layer 1 balances, layer 2 hovers near MaxVio 1, layer 3 starts skewed and stays "
         "imbalanced while its bias grows")
EXPECT = frozenset({"router_imbalance", "router_bias_growing"})
MODEL_KWARGS: dict[str, Any] = {
    "family": "deepseek_v3", "vocab_size": 128, "hidden_size": 32, "n_layers": 4, "n_heads": 4, "n_experts": 16,
    "top_k": 2, "expert_hidden": 16, "bias_update": 5e-4,
    "backbone_config": {"n_group": 4, "topk_group": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
                        "routed_scaling_factor": 2.5, "intermediate_size": 64},
}
DATA_KWARGS: dict[str, Any] = {"seq_len": 32, "vocab": 128, "seed": 0}
TRAIN: dict[str, Any] = {"steps": 400, "batch_size": 8, "lr": 1e-3, "optimizer": "adamw", "every": 10,
                         "flush_every": 100, "eval_every": 0, "saturation_every": 50}


def skewed(splits: Splits, config: TrainConfig) -> nn.Module:
    """The reference model, with the last router's first expert group (experts 0-3) aimed at the mean input of
    that router, so that group gets most tokens at the start."""
    model = build_model(splits, config)
    routers = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    means: list[torch.Tensor] = []
    hook = routers[-1].register_forward_pre_hook(lambda _m, inp: means.append(
        inp[0].reshape(-1, inp[0].shape[-1]).mean(0)))
    with torch.no_grad():
        model.eval()
        model(splits.x_train[:config.batch_size])
        hook.remove()
        routers[-1].weight[:4] = 30 * means[0] / means[0].norm()
    model.train()
    return model
