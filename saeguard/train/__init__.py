"""SAE training: the trainer (several SAEs side by side on one activation stream), its
optimisers, and the held-out reconstruction report. The `saeguard train` job is
:mod:`saeguard.jobs.train`."""

from saeguard.train.evaluate import evaluate_reconstruction, held_out_activations
from saeguard.train.trainer import Trainer, TrainerConfig, geometric_median, lr_factor

__all__ = [
    "Trainer",
    "TrainerConfig",
    "evaluate_reconstruction",
    "geometric_median",
    "held_out_activations",
    "lr_factor",
]
