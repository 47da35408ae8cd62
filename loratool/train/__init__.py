"""`loratool train`: copy-machine training (dreambooth and "wrong" arrive with their own issues)."""

from loratool.train.config import TrainConfig
from loratool.train.loop import TrainingInterrupted, run

__all__ = ["TrainConfig", "TrainingInterrupted", "run"]
