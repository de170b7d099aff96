"""Training SAEs from any iterator of activation batches."""

from saeguard.train.job import (
    TrainJobConfig,
    evaluate_reconstruction,
    held_out_activations,
    run_training,
)
from saeguard.train.trainer import Trainer, TrainerConfig, geometric_median, lr_factor

__all__ = [
    "TrainJobConfig",
    "Trainer",
    "TrainerConfig",
    "evaluate_reconstruction",
    "geometric_median",
    "held_out_activations",
    "lr_factor",
    "run_training",
]
