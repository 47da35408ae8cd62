"""The one in-memory LoRA representation that train, merge and sample speak.

A module's update is ΔW = (alpha / rank) · up @ down, with `down` rank×in (or rank×in×kh×kw for a conv)
and `up` out×rank (or out×rank×1×1). Paths are diffusers module paths inside the component; text
encoders use the classic `text_model.…` paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

COMPONENT_MODELS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass
class LoraModule:
    component: str
    path: str
    down: object  # torch.Tensor; typed loosely so importing this module does not import torch
    up: object
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def key(self) -> tuple[str, str]:
        return (self.component, self.path)

    def with_alpha(self, alpha: float) -> LoraModule:
        """The same ΔW written with another alpha: the change of scale is folded into `up` (in float32)."""
        factor = float(self.alpha) / float(alpha)
        up = self.up if factor == 1 else (self.up.float() * factor).to(self.up.dtype)
        return LoraModule(self.component, self.path, self.down, up, float(alpha))

    def delta(self):
        """The dense ΔW (float32), shaped like the target weight. For tests and small layers only."""

        down, up = self.down.float(), self.up.float()
        flat = (up.flatten(1) @ down.flatten(1)) * self.scale
        if self.is_conv:
            return flat.reshape(up.shape[0], *down.shape[1:])
        return flat


@dataclass
class LoraNetwork:
    """A set of LoRA modules keyed by (component, path), plus file metadata (all strings)."""

    modules: dict[tuple[str, str], LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "memory"

    def add(self, module: LoraModule) -> None:
        self.modules[module.key] = module

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def components(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self:
            counts[m.component] = counts.get(m.component, 0) + 1
        return counts

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self})

    def alphas(self) -> list[float]:
        return sorted({float(m.alpha) for m in self})
