"""`loratool inspect`: what a LoRA file holds and whether it fits a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratool.lora.io import works_in
from loratool.sdxl.index import model_index, read


@dataclass
class InspectConfig:
    file: str | Path  # FILE[:WEIGHT], read like every other verb's LoRA argument
    model: str | None = None  # a diffusers folder; None checks against real SDXL 1.0 base


def run(config: InspectConfig) -> dict:
    lora = read(str(config.file), model_index(config.model))
    network = lora.network
    dtypes = sorted({str(m.down.dtype).removeprefix("torch.") for m in network})
    return {
        "file": str(lora.path),
        "sha256": lora.sha256,
        "format": network.source_format,
        "works_in": works_in(network.source_format),
        "components": network.components(),
        "modules": len(network),
        "ranks": network.ranks(),
        "alphas": network.alphas(),
        "conv": any(m.is_conv for m in network),
        "dtypes": dtypes,
        "bytes": lora.path.stat().st_size,
        "matches_model": config.model or "stabilityai/stable-diffusion-xl-base-1.0 (reference config)",
        "metadata": network.metadata,
    }
