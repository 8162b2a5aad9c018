"""A tiny sparse mixture-of-experts multi-task model: a transformers 5 MoE backbone with fused experts and one tower
per task.

``SparseMoE(in_dim=16, tasks=["flag", "score"])`` builds a Qwen3-MoE (``family="qwen3_moe"``; also ``"olmoe"``,
``"mixtral"`` and ``"deepseek_v3"``) from a config, no download: ``n_layers`` decoder layers, each with a
top-``top_k`` router over ``n_experts`` experts kept in one ``[E, ...]`` parameter per projection (transformers'
``*Experts`` modules). ``backbone_config`` sets further fields of the transformers config, e.g. DeepSeek-V3's
expert groups (``{"n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "n_shared_experts": 1}``). The
input is ``[N, in_dim]`` token ids (any dtype; cast to int64); the backbone's last hidden states are averaged over
the sequence and each task's tower maps them to one value. ``forward`` returns one ``[N]`` tensor per task (raw
logits / values). Routers start from N(0, ``router_init_std``) weights, so they route by their input from the
first step.

``bias_update=u`` (DeepSeek-V3 routers only) balances the experts without an auxiliary loss, as DeepSeek-V3 does:
after each forward in training mode, each router's expert bias moves by ``u * sign(mean load - load)`` (the
number of the forward's tokens dispatched to each expert), applied before the next training forward. Needs
transformers (``pip install gatewatch[huggingface]``), imported when the model is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gatewatch.models.blocks import MultiTaskModel, arguments, check_sizes, make_towers

__all__ = ["FAMILIES", "SparseMoE"]

FAMILIES = ("qwen3_moe", "olmoe", "mixtral", "deepseek_v3")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "gatewatch.models.SparseMoE needs transformers 5: pip install gatewatch[huggingface]"
        ) from err
    return transformers


def _config(family: str, extra: Mapping[str, Any], **sizes: Any) -> Any:
    tf = _transformers()
    experts, top_k, expert_hidden = sizes.pop("n_experts"), sizes.pop("top_k"), sizes.pop("expert_hidden")
    if family == "deepseek_v3":  # multi-head latent attention, sized from the head width unless extra says
        head = sizes["hidden_size"] // sizes["num_attention_heads"]
        latent = {"kv_lora_rank": sizes["hidden_size"] // 2, "q_lora_rank": sizes["hidden_size"] // 2,
                  "qk_rope_head_dim": head, "qk_nope_head_dim": head, "v_head_dim": head}
        return tf.DeepseekV3Config(**{**sizes, **latent, "intermediate_size": expert_hidden,
                                      "moe_intermediate_size": expert_hidden, "n_routed_experts": experts,
                                      "num_experts_per_tok": top_k, "norm_topk_prob": True, **extra})
    if family == "mixtral":
        return tf.MixtralConfig(**{**sizes, "intermediate_size": expert_hidden, "num_local_experts": experts,
                                   "num_experts_per_tok": top_k, **extra})
    cls = tf.Qwen3MoeConfig if family == "qwen3_moe" else tf.OlmoeConfig
    return cls(**{**sizes, "intermediate_size": expert_hidden, "moe_intermediate_size": expert_hidden,
                  "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True, **extra})


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
        backbone_config: Mapping[str, Any] | None = None,
        bias_update: float = 0.0,
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
        if not (isinstance(bias_update, (int, float)) and 0 <= bias_update < math.inf):
            raise ValueError(f"bias_update must be a number >= 0 (0: no aux-loss-free balancing), got {bias_update!r}.")
        config = _config(family, dict(backbone_config or {}), vocab_size=vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                         max_position_embeddings=in_dim, n_experts=n_experts, top_k=top_k,
                         expert_hidden=expert_hidden)
        self.backbone = _transformers().AutoModel.from_config(config)
        with torch.no_grad():
            for module in self.backbone.modules():
                if type(module).__name__.lower().endswith("topkrouter"):
                    module.weight.normal_(0, router_init_std)
        self.towers = make_towers(self.tasks, hidden_size, tower_hidden)
        self._loads: dict[int, Tensor] = {}  # router index -> tokens dispatched per expert by the last forward
        if bias_update:
            biased = [m for m in self.backbone.modules() if isinstance(getattr(m, "e_score_correction_bias", None),
                                                                        Tensor)]
            if not biased:
                raise ValueError(f"bias_update needs routers with an expert bias (family='deepseek_v3'); the "
                                 f"{family!r} routers have none.")
            self._biased = biased
            for i, router in enumerate(biased):
                router.register_forward_hook(self._count_load(i))

    def _count_load(self, i: int) -> Any:
        def hook(module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            if module.training:
                self._loads[i] = torch.bincount(output[2].detach().reshape(-1), minlength=module.num_experts)
        return hook

    def _update_bias(self) -> None:
        """Aux-loss-free balancing: move each router's expert bias towards the mean load of the last forward."""
        with torch.no_grad():
            for i, load in self._loads.items():
                load = load.float()
                self._biased[i].e_score_correction_bias += self.config["bias_update"] * torch.sign(load.mean() - load)
        self._loads.clear()

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.training and self._loads:
            self._update_bias()
        hidden = self.backbone(input_ids=x.long()).last_hidden_state.mean(1)
        return self.tower_outputs([hidden] * len(self.tasks))
