"""Tiny transformers MoE models of every router family, built from configs (no downloads), for CPU tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

COMMON = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}
E = 8  # experts per layer


def _config(family: str) -> Any:
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, num_local_experts=E, num_experts_per_tok=2)
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        cls = {"qwen2_moe": tf.Qwen2MoeConfig, "qwen3_moe": tf.Qwen3MoeConfig, "olmoe": tf.OlmoeConfig}[family]
        extra = {"shared_expert_intermediate_size": 32} if family == "qwen2_moe" else {}
        return cls(**COMMON, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                   **extra)
    if family in ("deepseek_v3", "glm4_moe"):
        cls = tf.DeepseekV3Config if family == "deepseek_v3" else tf.Glm4MoeConfig
        extra = {"kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                 "v_head_dim": 8} if family == "deepseek_v3" else {"head_dim": 8}
        return cls(**COMMON, n_routed_experts=E, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4,
                   topk_group=2, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                   routed_scaling_factor=2.5, **extra)
    if family == "gpt_oss":
        return tf.GptOssConfig(**COMMON, num_local_experts=E, num_experts_per_tok=2, head_dim=8,
                               layer_types=["full_attention"] * 2)
    if family == "switch":
        return tf.SwitchTransformersConfig(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                           num_decoder_layers=2, num_heads=2, num_experts=E, expert_capacity=4,
                                           encoder_sparse_step=1, decoder_sparse_step=1)
    raise ValueError(family)


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss", "switch")


def build(family: str, seed: int = 0) -> nn.Module:
    """A tiny causal LM (Switch: encoder-decoder) of ``family`` with random weights, routers initialised."""
    import transformers as tf

    torch.manual_seed(seed)
    config = _config(family)
    cls = tf.SwitchTransformersForConditionalGeneration if family == "switch" else tf.AutoModelForCausalLM
    model = cls(config) if family == "switch" else cls.from_config(config)
    for name, p in model.named_parameters():  # some routers start at zero weights: give them real scores
        if name.endswith(("gate.weight", "router.weight", "router.classifier.weight")):
            with torch.no_grad():
                p.normal_(0, 0.3)
    return model


def batch(family: str, tokens: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs and labels of one step of ``tokens`` tokens (2 sequences)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, tokens // 2), generator=g)
    if family == "switch":
        return {"input_ids": ids, "decoder_input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": ids}
