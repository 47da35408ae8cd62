"""LoRA files as peft adapters on a live SDXL base pipeline, with their weights switched in place.

Files are read and checked against the model before anything is injected. Weights change through
diffusers' `set_adapters`; with `fuse`, the active weights are also merged into the base layers
(peft merge/unmerge through `fuse_lora`/`unfuse_lora`), so denoising costs what the plain model costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from loratool.lora.network import COMPONENT_MODELS, LoraNetwork

log = logging.getLogger(__name__)


@dataclass
class LoadedLora:
    path: Path
    weight: float
    adapter: str  # never "A"/"B": those collide with peft's lora_A/lora_B keys
    sha256: str
    network: LoraNetwork = field(repr=False)

    def record(self, swept: bool) -> dict:
        return {"file": str(self.path), "name": self.path.stem, "sha256": self.sha256, "weight": self.weight} | (
            {"swept": swept}
        )


def read_loras(pipe, specs: list[tuple[Path, float]], swept: int) -> list[LoadedLora]:
    """Read every file and check it fits `pipe` (a LoRA for another base fails here, before any rendering)."""
    from loratool.files import sha256
    from loratool.lora.apply import layer_shapes
    from loratool.lora.io import check_fits, keymap_for, read_lora

    keymap = keymap_for(pipe.unet)
    shapes = {}
    for component, attr in COMPONENT_MODELS.items():
        if getattr(pipe, attr, None) is not None:
            shapes |= layer_shapes(getattr(pipe, attr), component)
    loras = []
    for i, (path, weight) in enumerate(specs):
        network = read_lora(path, keymap)
        check_fits(network, shapes, str(path))
        name = "sweep" if i == swept else f"fixed{i}"
        loras.append(LoadedLora(Path(path), weight, name, sha256(path), network))
    return loras


class Adapters:
    """The LoRAs injected into a pipeline and the weights they currently have."""

    def __init__(self, pipe, loras: list[LoadedLora], fuse: bool = True):
        import warnings

        from loratool.lora.apply import add_adapter

        self.pipe, self.loras, self.fuse = pipe, loras, fuse
        self.names = [lora.adapter for lora in loras]
        parts = set()
        for lora in loras:
            for component, attr in COMPONENT_MODELS.items():
                model = getattr(pipe, attr, None)
                if model is not None and lora.network.components().get(component):
                    with warnings.catch_warnings():  # several adapters in one model are what we want
                        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                        add_adapter(model, lora.network, component, lora.adapter)
                    parts.add(attr)
        self.components = sorted(parts)
        self.fused = False
        self.current: tuple[float, ...] | None = None
        self.set([0.0] * len(loras))

    @property
    def touches_text(self) -> bool:
        """Text-encoder parts make the prompt embeddings depend on the weights."""
        return any(c != "unet" for c in self.components)

    def set(self, weights: list[float]) -> None:
        """Give adapter i weight `weights[i]`; unchanged weights cost nothing."""
        weights = tuple(float(w) for w in weights)
        if weights == self.current:
            return
        if self.fused:  # unmerge with the old scaling before it changes
            self.pipe.unfuse_lora(components=self.components)
            self.fused = False
        self.pipe.set_adapters(self.names, adapter_weights=list(weights))
        if self.fuse:
            self.pipe.fuse_lora(components=self.components, adapter_names=self.names)
            self.fused = True
        self.current = weights
        log.debug("adapter weights %s", dict(zip(self.names, weights, strict=True)))
