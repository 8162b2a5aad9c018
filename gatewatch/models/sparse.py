"""A tiny sparse mixture-of-experts multi-task model: a transformers 5 MoE backbone with fused experts and one tower
per task.

``SparseMoE(in_dim=16, tasks=["flag", "score"])`` builds a Qwen3-MoE (``family="qwen3_moe"``; also ``"olmoe"``
and ``"mixtral"``) from a config, no download: ``n_layers`` decoder layers, each with a top-``top_k`` router over
``n_experts`` experts kept in one ``[E, ...]`` parameter per projection (transformers' ``*Experts`` modules). The
input is ``[N, in_dim]`` token ids (any dtype; cast to int64); the backbone's last hidden states are averaged over
the sequence and each task's tower maps them to one value. ``forward`` returns one ``[N]`` tensor per task (raw
logits / values). Routers start from N(0, ``router_init_std``) weights, so they route by their input from the
first step. Needs transformers (``pip install gatewatch[huggingface]``), imported when the model is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gatewatch.models.blocks import MultiTaskModel, arguments, check_sizes, make_towers

__all__ = ["FAMILIES", "SparseMoE"]

FAMILIES = ("qwen3_moe", "olmoe", "mixtral")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "gatewatch.models.SparseMoE needs transformers 5: pip install gatewatch[huggingface]"
        ) from err
    return transformers


def _config(family: str, **sizes: Any) -> Any:
    tf = _transformers()
    experts, top_k, expert_hidden = sizes.pop("n_experts"), sizes.pop("top_k"), sizes.pop("expert_hidden")
    if family == "mixtral":
        return tf.MixtralConfig(**sizes, intermediate_size=expert_hidden, num_local_experts=experts,
                                num_experts_per_tok=top_k)
    cls = tf.Qwen3MoeConfig if family == "qwen3_moe" else tf.OlmoeConfig
    return cls(**sizes, intermediate_size=expert_hidden, moe_intermediate_size=expert_hidden, num_experts=experts,
               num_experts_per_tok=top_k, norm_topk_prob=True)


class SparseMoE(MultiTaskModel):
    """A transformers MoE backbone (fused experts, top-k routers) + one tower per task; see the module docstring."""

    def __init__(
        self,
        *,
        in_dim: int,
        tasks: Sequence[str],
        family: str = "qwen3_moe",
        vocab_size: int = 64,
        hidden_size: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        n_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int = 32,
        tower_hidden: Sequence[int] = (16,),
        router_init_std: float = 0.3,
    ) -> None:
        super().__init__(arguments(locals()))
        if family not in FAMILIES:
            raise ValueError(f"unknown SparseMoE family {family!r}; choose one of {list(FAMILIES)}.")
        check_sizes(in_dim=in_dim, vocab_size=vocab_size, hidden_size=hidden_size, n_layers=n_layers,
                    n_heads=n_heads, n_experts=n_experts, top_k=top_k, expert_hidden=expert_hidden)
        check_sizes(tower_hidden=tower_hidden)
        if not top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be at most n_experts ({n_experts}).")
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of n_heads ({n_heads}).")
        config = _config(family, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=in_dim,
                         n_experts=n_experts, top_k=top_k, expert_hidden=expert_hidden)
        self.backbone = _transformers().AutoModel.from_config(config)
        with torch.no_grad():
            for module in self.backbone.modules():
                if type(module).__name__.endswith("TopKRouter"):
                    module.weight.normal_(0, router_init_std)
        self.towers = make_towers(self.tasks, hidden_size, tower_hidden)

    def forward(self, x: Tensor) -> list[Tensor]:
        hidden = self.backbone(input_ids=x.long()).last_hidden_state.mean(1)
        return self.tower_outputs([hidden] * len(self.tasks))
