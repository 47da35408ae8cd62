"""`loratool train`: copy-machine, dreambooth and the negative "wrong" LoRA, through one loop."""

from loratool.train.config import DreamboothConfig, TrainConfig
from loratool.train.loop import TrainingInterrupted, run

__all__ = ["DreamboothConfig", "TrainConfig", "TrainingInterrupted", "run"]
