"""Do demo renders agree with their captions? Colour, horizontal position and size, read back by `describe`.

    python -m loratool.demo.quality --model DIR/base --refiner DIR/refiner [--sheet sheet.png]

Prints one JSON line: agreement rates per attribute, `agreement` (colour, position and size all right; target
≥ 0.8) and `empty_prompt_sane` (renders of "" that show one shape of a plausible size on a plain background,
what copy-machine training starts from).
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from loratool.demo import shapes

log = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "position", "size", "shape")
SANE_AREA = (150, 6000)  # px at 128: one shape, neither a speck nor a full-frame texture
SANE_FILL = 0.35  # of its bounding box: a solid shape, not scattered texture


@dataclass(frozen=True)
class Render:
    steps: int = 25
    guidance: float = 5.0
    high_noise_fraction: float = 0.8  # base denoises to here, the refiner the rest (SDXL's ensemble of experts)
    batch: int = 16


def check_scenes(n: int, seed: int = 0) -> list[shapes.Scene]:
    """n distinct white-background scenes (all 72 combinations, shuffled by `seed`, repeated if n > 72)."""
    combos = list(itertools.product(shapes.SHAPES, shapes.COLOURS, shapes.RADII, shapes.CENTRES_X))
    order = np.random.default_rng(seed).permutation(len(combos))
    return [shapes.Scene(*combos[order[i % len(combos)]]) for i in range(n)]


def render(base, refiner, prompts: list[str], seeds: list[int], cfg: Render) -> list[Image.Image]:
    """One image per (prompt, seed) pair, through the base and (when given) the refiner."""
    import torch

    images = []
    for i in range(0, len(prompts), cfg.batch):
        batch, batch_seeds = prompts[i : i + cfg.batch], seeds[i : i + cfg.batch]
        gens = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
        common = dict(prompt=batch, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=gens)
        if refiner is None:
            images += base(**common).images
            continue
        latents = base(**common, denoising_end=cfg.high_noise_fraction, output_type="latent").images
        images += refiner(**common, image=latents, denoising_start=cfg.high_noise_fraction).images
    return images


def _at_128(image: Image.Image) -> Image.Image:
    """describe()'s thresholds are in pixels at the generator's size."""
    size = (shapes.SIZE, shapes.SIZE)
    return image if image.size == size else image.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def agreement(images: list[Image.Image], scenes: list[shapes.Scene]) -> dict:
    """Per-attribute agreement rates and the rate at which colour, position and size are all right."""
    hits = {a: 0 for a in ATTRIBUTES} | {"agreement": 0}
    for image, scene in zip(images, scenes, strict=True):
        seen = shapes.describe(_at_128(image))
        right = {a: getattr(seen, a) == getattr(scene, a) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += right[a]
        hits["agreement"] += right["colour"] and right["position"] and right["size"]
    return {k: round(v / max(len(scenes), 1), 3) for k, v in hits.items()}


def sane(image: Image.Image) -> bool:
    seen = shapes.describe(_at_128(image))
    return seen.colour is not None and SANE_AREA[0] <= seen.area <= SANE_AREA[1] and seen.fill >= SANE_FILL


def contact_sheet(images: list[Image.Image], columns: int = 12) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), "gray")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet


def check(base, refiner, prompts: int = 24, seeds: int = 2, empty: int = 8, cfg: Render = Render()):
    """(report, images): `prompts` captions × `seeds` seeds, plus `empty` renders of the empty prompt."""
    scenes = [s for s in check_scenes(prompts) for _ in range(seeds)]
    seed_list = [k for _ in range(prompts) for k in range(seeds)]
    images = render(base, refiner, [s.caption for s in scenes], seed_list, cfg)
    blank = render(base, refiner, [""] * empty, list(range(empty)), cfg)
    report = agreement(images, scenes)
    report["empty_prompt_sane"] = round(sum(map(sane, blank)) / max(empty, 1), 3)
    report["renders"] = len(images) + len(blank)
    return report, images + blank


def main(argv: list[str] | None = None) -> None:
    import argparse

    from loratool.sdxl.models import load_models, pick_runtime

    p = argparse.ArgumentParser(prog="python -m loratool.demo.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the demo base folder")
    p.add_argument("--refiner", default=None, help="the demo refiner folder (omit for base only)")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default=None)
    p.add_argument("--sheet", default=None, help="save all renders as one PNG here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    runtime = pick_runtime(a.device)
    base, refiner = load_models(a.model, a.refiner, runtime, vae="base")  # the demo's own VAE, never the fp16-fix
    report, images = check(base, refiner, a.prompts, a.seeds, cfg=Render(steps=a.steps, guidance=a.guidance))
    if a.sheet:
        contact_sheet(images).save(a.sheet)
        log.info("contact sheet: %s", a.sheet)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
