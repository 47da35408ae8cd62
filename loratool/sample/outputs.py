"""The files `loratool sample` writes, and what they say about themselves: PNGs with A1111 `parameters` and
`loratool` text chunks, the contact sheet, one animation per seed, and sweep.json with the slider metrics.

Every path is planned before any model is loaded, so an existing file stops the run before any work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from loratool import __version__
from loratool.files import atomic_path
from loratool.sample.config import SampleConfig
from loratool.sample.quality import log_table, measure, summarise, summary_line
from loratool.sample.scales import image_name, scale_labels
from loratool.sample.sheet import contact_sheet, save_animation, save_sheet

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Every file a run writes, known before any model is loaded."""

    images: dict[tuple[int, float], Path]  # (seed, scale) → png; without LoRAs the scale is 0.0
    references: dict[int, Path] = field(default_factory=dict)  # scale-0 images when 0 is not a swept scale
    sheet: Path | None = None
    animations: dict[int, Path] = field(default_factory=dict)
    manifest: Path | None = None

    def all(self) -> list[Path]:
        extra = [p for p in (self.sheet, self.manifest) if p]
        return [*self.images.values(), *self.references.values(), *extra, *self.animations.values()]


def plan(config: SampleConfig) -> Plan:
    out = Path(config.output)
    if not config.loras:
        return Plan({(seed, 0.0): out / f"seed{seed}.png" for seed in config.seeds})
    labels = dict(zip(config.scales, scale_labels(config.scales), strict=True))
    images = {(seed, s): out / image_name(seed, labels[s]) for seed in config.seeds for s in config.scales}
    refs = {} if 0.0 in config.scales else {seed: out / image_name(seed, "0.00") for seed in config.seeds}
    gifs = {seed: out / f"sweep-seed{seed}.gif" for seed in config.seeds}
    return Plan(images, refs, out / "sheet.png", gifs, out / "sweep.json")


def parameters_text(
    config: SampleConfig, seed: int, size: tuple[int, int], loras: list[dict], scale=None, reference=None
) -> str:
    """A1111-style `parameters` chunk, so other UIs and image viewers show how an image was made."""
    lines = [config.prompt, f"Negative prompt: {config.negative_prompt}"]
    fields = [
        f"Steps: {config.steps}, CFG scale: {config.guidance}, Seed: {seed}, Size: {size[0]}x{size[1]}",
        f"Model: {config.model}, Refiner: {config.refiner if config.uses_refiner else 'none'}",
        f"High noise frac: {config.high_noise_frac}",
    ]
    if config.guidance_rescale:
        fields.append(f"CFG Rescale phi: {config.guidance_rescale}")  # the key A1111's extension and Forge read
    if config.scheduler:
        fields.append(f"Sampler: {config.scheduler}")
    if loras:
        names = ", ".join(f"{x['name']}: {x['sha256'][:12]}" for x in loras)
        weights = ", ".join(f"<lora:{x['name']}:{x['weight']}>" for x in loras)
        fields.append(f'Lora hashes: "{names}", Lora weights: "{weights}"')
        swept = next(x for x in loras if x["swept"])
        fields.append(f"Slider: {swept['name']}, Slider scale: {scale}, LoRA start: {config.lora_start}")
    if reference:
        fields.append(reference_text(reference))
    fields.append(f"Version: loratool {__version__}")
    return "\n".join([*lines, ", ".join(fields)])


def reference_text(reference: dict) -> str:
    """The reference in the `parameters` chunk: file, hash and how it guided the render."""
    fidelity = "" if reference["style_fidelity"] is None else f", Style fidelity: {reference['style_fidelity']}"
    return (
        f'Reference: "{Path(reference["file"]).name}: {reference["sha256"][:12]}", '
        f"Reference mode: {reference['mode']}, Reference variant: {reference['variant']}{fidelity}, "
        f"Reference weight: {reference['weight']}, Reference on refiner: {reference['refiner']}"
    )


def save_png(
    image, path: Path, config: SampleConfig, seed: int, loras: list[dict] | None = None, scale=None, reference=None
) -> None:
    """`reference` is Reference.record() of a --reference run."""
    from PIL.PngImagePlugin import PngInfo

    loras = loras or []
    info = PngInfo()
    info.add_text("parameters", parameters_text(config, seed, image.size, loras, scale, reference))
    record = config.record() | {"seed": seed, "size": list(image.size)}
    if loras:
        record |= {"scale": scale, "lora_weights": loras}
    if reference:
        record["reference_sha256"] = reference["sha256"]
    info.add_text("loratool", json.dumps(record))
    with atomic_path(path, force=config.force) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def write_sweep(
    config: SampleConfig, outputs: Plan, images: dict, loras: list[dict], n_base: int, reference=None
) -> list[Path]:
    """PNGs with parameters, the contact sheet, one animation per seed, and sweep.json; `n_base` is how many
    steps the base (and so the LoRAs) ran, `reference` the --reference record."""
    for (seed, scale), path in outputs.images.items():
        save_png(images[(seed, scale)], path, config, seed, loras, scale, reference)
    for seed, path in outputs.references.items():
        save_png(images[(seed, 0.0)], path, config, seed, loras, 0.0, reference)
    grid = [[images[(seed, s)] for s in config.scales] for seed in config.seeds]
    swept = next(x for x in loras if x["swept"])
    # ASCII only: Pillow's bundled font has no glyphs for × or —.
    title = (f"{swept['name']}: scale" + (f' | "{config.prompt}"' if config.prompt else ""))[:80]
    sheet = contact_sheet(grid, scale_labels(config.scales), [f"seed {s}" for s in config.seeds], title)
    save_sheet(sheet, outputs.sheet, config.force)
    for seed, path in outputs.animations.items():
        save_animation([images[(seed, s)] for s in sorted(config.scales)], path, config.force)
    metrics = measure(config.scales, config.seeds, images)
    summary = summarise(config.scales, metrics)
    log_table(config.scales, metrics)
    manifest = _manifest(config, outputs, loras, n_base) | {"reference": reference}
    manifest |= {"metrics": metrics, "summary": summary}
    with atomic_path(outputs.manifest, force=config.force) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info(summary_line(summary))
    written = outputs.all()
    log.info("wrote %d files to %s", len(written), config.output)
    return written


def refiner_policy(config: SampleConfig, n_base: int) -> dict:
    if not config.uses_refiner:
        return {"refiner": None, "policy": "base only: the base, with the LoRAs, runs every step", "base_steps": n_base}
    return {
        "refiner": config.refiner,
        "policy": "ensemble of experts: the base with the LoRAs denoises the first high_noise_frac of the "
        "schedule, the refiner WITHOUT LoRAs the rest (refiner_frac = 1 - high_noise_frac)",
        "high_noise_frac": config.high_noise_frac,
        "refiner_frac": round(1.0 - config.high_noise_frac, 10),
        "base_steps": n_base,
        "refiner_steps": config.steps - n_base,
        "refiner_loras": [],
    }


def _manifest(config: SampleConfig, outputs: Plan, loras: list[dict], n_base: int) -> dict:
    def rel(path: Path) -> str:
        return path.name

    return {
        "loratool_version": __version__,
        "config": config.record(),
        "loras": loras,
        "refiner": refiner_policy(config, n_base),
        "lora_start": {"fraction": config.lora_start, "base_steps_off": round(config.lora_start * n_base)},
        "files": {
            "images": [{"seed": s, "scale": x, "file": rel(p)} for (s, x), p in outputs.images.items()],
            "references": {str(s): rel(p) for s, p in outputs.references.items()},
            "sheet": rel(outputs.sheet),
            "animations": {str(s): rel(p) for s, p in outputs.animations.items()},
        },
    }
