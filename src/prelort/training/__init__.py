"""Local client training: plain or prefix-nested objectives with a masked AdamW step."""

from prelort.training.lm_loss import answer_loss
from prelort.training.local import LocalTrainConfig, TrainStats, level_distribution, train_local
from prelort.training.optim import MaskedAdamW

__all__ = [
    "LocalTrainConfig",
    "MaskedAdamW",
    "TrainStats",
    "answer_loss",
    "level_distribution",
    "train_local",
]
