"""LoRA files as peft adapters on a live SDXL base pipeline, with their weights switched in place.

Files are read and checked against the model (`sdxl.index.read`) before anything is injected. Weights change
through diffusers' `set_adapters`; with `fuse`, the active weights are also merged into the base layers
(peft merge/unmerge through `fuse_lora`/`unfuse_lora`), so denoising costs what the plain model costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loratool.lora.apply import add_adapter, fold_network
from loratool.lora.network import COMPONENT_MODELS, LoraNetwork
from loratool.sdxl.index import CheckedLora, LoraSpec, ModelIndex, read

log = logging.getLogger(__name__)


@dataclass
class LoadedLora(CheckedLora):
    adapter: str = "lora"  # never "A"/"B": those collide with peft's lora_A/lora_B keys

    def record(self, swept: bool) -> dict:
        return {"file": str(self.path), "name": self.path.stem, "sha256": self.sha256, "weight": self.weight} | (
            {"swept": swept}
        )


def read_loras(pipe, specs: list[str | LoraSpec], swept: int) -> list[LoadedLora]:
    """Read every `FILE[:WEIGHT]` and check it fits `pipe` (another base's LoRA fails here, before any rendering)."""
    index = ModelIndex.of_pipeline(pipe)
    loras = []
    for i, spec in enumerate(specs):
        checked = read(spec, index)
        loras.append(LoadedLora(**vars(checked), adapter="sweep" if i == swept else f"fixed{i}"))
    return loras


MODES = ("fold", "fuse", "adapters")


class Adapters:
    """The LoRAs on a pipeline and the weights they currently have. Three ways to switch weights:

    - "adapters": peft adapters (apply.add_adapter), weights through diffusers' set_adapters;
    - "fuse": the same adapters, active weights merged into the layers (fuse_lora/unfuse_lora);
    - "fold": no wrappers at all: W += (new - old) · ΔW per switch (apply.fold_network), so each step
      costs exactly what the plain model costs (peft's wrappers cost Python time even when merged).
    """

    def __init__(self, pipe, loras: list[LoadedLora], mode: str = "fold"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.pipe, self.loras, self.mode = pipe, loras, mode
        self.names = [lora.adapter for lora in loras]
        parts = set()
        for lora in loras:
            for component, attr in COMPONENT_MODELS.items():
                model = getattr(pipe, attr, None)
                if model is None or not lora.network.components().get(component):
                    continue
                parts.add(attr)
                if mode == "fold":
                    _to_device(lora.network, component, model)
                    continue
                add_adapter(model, lora.network, component, lora.adapter)
        self.components = sorted(parts)
        self.fused = False
        self.current: tuple[float, ...] | None = (0.0,) * len(loras) if mode == "fold" else None
        self.set([0.0] * len(loras))

    @property
    def touches_text(self) -> bool:
        """Text-encoder parts make the prompt embeddings depend on the weights."""
        return any(c != "unet" for c in self.components)

    def set(self, weights: list[float]) -> None:
        """Give LoRA i weight `weights[i]`; unchanged weights cost nothing."""
        weights = tuple(float(w) for w in weights)
        if weights == self.current:
            return
        if self.mode == "fold":
            self._fold(weights)
        else:
            if self.fused:  # unmerge with the old scaling before it changes
                self.pipe.unfuse_lora(components=self.components)
                self.fused = False
            self.pipe.set_adapters(self.names, adapter_weights=list(weights))
            if self.mode == "fuse":
                self.pipe.fuse_lora(components=self.components, adapter_names=self.names)
                self.fused = True
        self.current = weights
        log.debug("LoRA weights %s", dict(zip(self.names, weights, strict=True)))

    def _fold(self, weights: tuple[float, ...]) -> None:
        """One rounding per switch (computed in float32); back at 0 the layers are W0 up to that rounding."""
        for lora, old, new in zip(self.loras, self.current, weights, strict=True):
            if new != old:
                for component, attr in COMPONENT_MODELS.items():
                    if attr in self.components:
                        fold_network(getattr(self.pipe, attr), lora.network, component, new - old)


def _to_device(network: LoraNetwork, component: str, model) -> None:
    """Factors next to the weights (float32), so each fold computes ΔW on the accelerator."""
    device = next(model.parameters()).device
    for m in network:
        if m.component == component:
            m.down, m.up = m.down.to(device, dtype=m.down.dtype), m.up.to(device, dtype=m.up.dtype)
