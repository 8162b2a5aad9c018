"""Training with GateWatch attached: data sets by name, the loop, evaluation, checkpoints, the demo."""

from .checkpoint import CheckpointError, ModelInfo, load_model, read_model_info, save_model
from .datasets import DATASETS, Splits, load_dataset, load_ref
from .loop import MODELS, TrainConfig, TrainResult, build_model, train
from .metrics import evaluate, roc_auc

__all__ = [
    "DATASETS",
    "MODELS",
    "CheckpointError",
    "ModelInfo",
    "Splits",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "load_dataset",
    "load_model",
    "load_ref",
    "read_model_info",
    "roc_auc",
    "save_model",
    "train",
]
