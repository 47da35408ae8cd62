"""How long a training stage runs (a step count, or a time box) and its learning-rate curve."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Budget:
    """A stage runs `steps` steps when given (reproducible), else until `seconds` have passed.

    The learning rate warms up linearly over `warmup` steps, then follows a cosine down to `floor` of its peak
    over the stage's progress: step/steps, or elapsed/seconds when time-boxed.
    """

    steps: int | None = None
    seconds: float = 60.0
    warmup: int = 100
    floor: float = 0.05
    start: float = field(default_factory=time.perf_counter)

    def progress(self, step: int) -> float:
        if self.steps is not None:  # 0 steps: the stage is skipped (a fine-tune that keeps the VAE)
            return step / self.steps if self.steps else 1.0
        return (time.perf_counter() - self.start) / self.seconds

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(self.warmup, 1))
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(self.progress(step), 1.0)))
        return warm * (self.floor + (1.0 - self.floor) * cosine)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
