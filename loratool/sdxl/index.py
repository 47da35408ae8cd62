"""What a LoRA is checked against, and the one reader that checks it: every verb reads LoRAs through `read`.

A model index is a model's key map plus the weight shape of every Linear/Conv2d by (component, path). It
comes from the shipped SDXL 1.0 base data (no model given), a diffusers folder's configs (meta device, no
weights read) or a loaded pipeline. `read` turns `FILE[:WEIGHT]` into a network merge, merge --into-base,
train --base-lora, sample --lora and inspect can all trust: parsed one way, read, fitted to the model,
finite, hashed. One reader means one set of error messages: the same bad file fails the same way everywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from loratool.errors import InputError, LoraFileError
from loratool.files import sha256
from loratool.lora.apply import layer_shapes
from loratool.lora.io import check_fits, keymap_for, read_lora
from loratool.lora.keys import KeyMap
from loratool.lora.network import LoraNetwork
from loratool.sdxl import reference

EXAMPLE = "write FILE[:WEIGHT], e.g. b.safetensors:-1"
# fp16's largest number: no trained LoRA factor comes near it, and a bigger one overflows every fp16 merge
# (a 1e20 entry once made its module's ΔW look like zero and be dropped).
MAX_FACTOR = 65504.0


class LoraSpec(NamedTuple):
    """A LoRA file and the weight it is used at; a tuple, so `path, weight = spec` works."""

    path: Path
    weight: float = 1.0


def parse_spec(spec: str | Path | tuple[Path, float]) -> LoraSpec:
    """`FILE[:WEIGHT]` (weight default 1) → LoraSpec. From the Python API, a Path is a file at weight 1 and a
    (path, weight) pair has its weight checked.

    The text after the last colon is a weight unless the whole text names an existing file or that text
    holds a path separator (C:\\loras\\a.safetensors): a path may contain colons, a weight may not be a typo.
    """
    if isinstance(spec, Path):
        return LoraSpec(spec)
    if not isinstance(spec, str):
        path, weight = spec
        return LoraSpec(Path(path), _finite(f"{path}:{weight}", float(weight)))
    head, colon, tail = spec.rpartition(":")
    if not colon or not head or "/" in tail or "\\" in tail or Path(spec).exists():
        return LoraSpec(Path(spec))
    try:
        weight = float(tail)
    except ValueError:
        raise InputError(
            f"LoRA {spec}: weight {tail!r} is not a number and no file has that name; {EXAMPLE}."
        ) from None
    return LoraSpec(Path(head), _finite(spec, weight))


def _finite(spec: str, weight: float) -> float:
    if not math.isfinite(weight):
        raise InputError(f"LoRA {spec}: weight {weight} is not a finite number; {EXAMPLE}.")
    return weight


@dataclass
class ModelIndex:
    """A model's key map and {(component, path): weight shape}: everything a LoRA is checked against."""

    keymap: KeyMap
    shapes: dict[tuple[str, str], tuple[int, ...]]
    unet_config: dict = field(default_factory=lambda: dict(reference.BASE_UNET))

    @classmethod
    def of_models(cls, unet, te1=None, te2=None) -> ModelIndex:
        """Live or meta-device models; the text encoders are optional (a UNet-only check)."""
        shapes = layer_shapes(unet, "unet")
        for component, encoder in (("te1", te1), ("te2", te2)):
            if encoder is not None:
                shapes |= layer_shapes(encoder, component)
        return cls(keymap_for(unet), shapes, dict(unet.config))

    def base_metadata(self, name: str | None) -> dict[str, str]:
        """What a LoRA made or merged on this model records about it: version family, model used, native size."""
        size = 8 * int(self.unet_config.get("sample_size", 128))  # latents are 1/8 of the image in SDXL's VAE
        return {
            "ss_base_model_version": reference.base_model_version(self.unet_config),
            "ss_sd_model_name": name or "stabilityai/stable-diffusion-xl-base-1.0",
            "modelspec.resolution": f"{size}x{size}",
        }

    @classmethod
    def of_pipeline(cls, pipe) -> ModelIndex:
        return cls.of_models(pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))


def model_index(model: str | None) -> ModelIndex:
    """The index of a diffusers folder (configs on the meta device, no weights), or of real SDXL base if None.

    Real SDXL base reads the shipped layer index: importing diffusers to build it would cost more than a merge.
    """
    if model is None:
        shapes = reference.load_base_index()
        return ModelIndex(KeyMap.for_unet(reference.BASE_UNET, [p for c, p in shapes if c == "unet"]), shapes)
    return ModelIndex.of_models(*reference.meta_components(model))


@dataclass
class CheckedLora:
    """A LoRA file that was read, fits the model and holds only finite floating-point numbers."""

    path: Path
    weight: float
    sha256: str
    network: LoraNetwork = field(repr=False)


def read(spec: str | Path | tuple[Path, float], index: ModelIndex) -> CheckedLora:
    """The one way a verb reads a LoRA: parse `FILE[:WEIGHT]`, read any supported format, check, hash."""
    path, weight = parse_spec(spec)
    network = read_lora(path, index.keymap)
    check_fits(network, index.shapes, str(path))
    check_numbers(network, path)
    return CheckedLora(path, weight, sha256(path), network)


def check_numbers(network: LoraNetwork, path: Path) -> None:
    """Floating-point, finite factors and alphas: one NaN would poison every merged direction and every pixel."""
    from loratool.lora import ops  # torch: parse_spec stays importable without it

    for m in network:
        name = f"{path}: module {m.component}:{m.path}"
        if not (m.down.is_floating_point() and m.up.is_floating_point()):
            raise LoraFileError(f"{name} has {m.down.dtype} factors, not floating point: re-save the LoRA as float.")
        try:
            ops.check_finite(name, m.down, m.up)
        except ValueError as exc:
            raise LoraFileError(f"{exc}: the file is damaged; retrain or re-download it.") from None
        peak = max(float(t.abs().amax()) if t.numel() else 0.0 for t in (m.down, m.up))
        if peak > MAX_FACTOR:
            raise LoraFileError(
                f"{name} holds a value of {peak:.3g}, beyond fp16's {MAX_FACTOR:g} and any trained LoRA's: "
                "the file is damaged; retrain or re-download it."
            )
        if not math.isfinite(m.alpha):
            raise LoraFileError(f"{name}: alpha contains NaN or inf: the file is damaged; retrain or re-download it.")
        if m.alpha < 0:
            raise LoraFileError(f"{name}: alpha {m.alpha} is negative: the file is damaged; retrain or re-download it.")


def build_base_index() -> dict[str, dict[str, list[int]]]:
    """SDXL 1.0 base's index built afresh from the reference configs (what `reference.BASE_INDEX` ships)."""
    index = ModelIndex.of_models(*reference.meta_components(None))
    out: dict[str, dict[str, list[int]]] = {}
    for (component, path), shape in sorted(index.shapes.items()):
        out.setdefault(component, {})[path] = list(shape)
    return out


if __name__ == "__main__":  # regenerate the shipped index: python -m loratool.sdxl.index
    reference.BASE_INDEX.write_text(json.dumps(build_base_index(), separators=(",", ":")))
