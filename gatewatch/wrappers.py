"""The user's model inside the wrappers training adds (DDP, FSDP, ``torch.compile``)."""

from __future__ import annotations

from torch import nn

WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "OptimizedModule")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / FSDP / compiled wrappers."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and type(model).__name__ in WRAPPERS:
            return unwrap(inner)
    return model
