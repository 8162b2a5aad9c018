"""The train, validation and test tensors every data set of gatewatch comes as."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class SplitTensors:
    """Float32 inputs ``[N, D]`` and targets ``[N, K]`` of the train, validation and test splits."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def in_dim(self) -> int:
        """Number of input features."""
        return int(self.x_train.shape[1])
