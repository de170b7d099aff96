"""Training SAEs from any iterator of activation batches."""

from saeguard.train.trainer import Trainer, TrainerConfig, geometric_median, lr_factor

__all__ = ["Trainer", "TrainerConfig", "geometric_median", "lr_factor"]
