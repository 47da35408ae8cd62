"""`loratool inspect`: what a LoRA file holds and whether it fits a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class InspectConfig:
    file: Path
    model: str | None = None  # a diffusers folder; None checks against real SDXL 1.0 base


def model_index(model: str | None):
    """Key map and layer shapes of a model, from configs on the meta device (no weights loaded).

    Real SDXL base (model None) reads the shipped layer index instead: importing diffusers to build it
    would cost more than the whole merge.
    """
    from loratool.lora.keys import KeyMap
    from loratool.sdxl import reference

    if model is None:
        shapes = reference.load_base_index()
        return KeyMap.for_unet(reference.BASE_UNET, [p for c, p in shapes if c == "unet"]), shapes
    return index_of(*reference.meta_components(model))


def index_of(unet, te1=None, te2=None):
    """Key map and {(component, path): weight shape} of live or meta-device models."""
    from loratool.lora.apply import layer_shapes
    from loratool.lora.io import keymap_for

    shapes = layer_shapes(unet, "unet")
    for component, encoder in (("te1", te1), ("te2", te2)):
        if encoder is not None:
            shapes |= layer_shapes(encoder, component)
    return keymap_for(unet), shapes


def run(config: InspectConfig) -> dict:
    from loratool.files import sha256
    from loratool.lora.io import check_fits, read_lora

    keymap, shapes = model_index(config.model)
    network = read_lora(config.file, keymap)
    check_fits(network, shapes, str(config.file))
    dtypes = sorted({str(m.down.dtype).removeprefix("torch.") for m in network})
    return {
        "file": str(config.file),
        "sha256": sha256(config.file),
        "format": network.source_format,
        "components": network.components(),
        "modules": len(network),
        "ranks": network.ranks(),
        "alphas": network.alphas(),
        "conv": any(m.is_conv for m in network),
        "dtypes": dtypes,
        "bytes": Path(config.file).stat().st_size,
        "matches_model": config.model or "stabilityai/stable-diffusion-xl-base-1.0 (reference config)",
        "metadata": network.metadata,
    }
