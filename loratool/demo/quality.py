"""Do demo renders agree with their captions? Colour, horizontal position, size and shape, read back by `describe`.

    python -m loratool.demo.quality --model DIR/base --refiner DIR/refiner [--sheet sheet.png]

Prints one JSON line: agreement per attribute with full captions (`full`) and with partial ones (`partial`,
counted over the attributes each caption names), `agreement` (colour, position and size all right on full
captions), `varies` (for prompts that leave an attribute out, the share whose seeds render more than one value
of it: a model that always draws the same size for "a red circle" has nothing for a size slider to move),
`left_out_gap` (how much of what the data spans those seeds leave empty: per attribute, the median over
prompts of the widest empty stretch, beside what as many uniform draws would leave; two words seen can still
both come from one corner of the wheel), and `empty_prompt_sane` (renders of "" that show one plausible shape,
what copy-machine training starts from).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from loratool import libraries
from loratool.demo import shapes

log = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "position", "size", "shape")
SANE_AREA = (150, 6000)  # px at 128: one shape, neither a speck nor a full-frame texture
SANE_FILL = 0.35  # of its bounding box: a solid shape, not scattered texture
SPANS = {"colour": (0.0, 360.0), "position": shapes.CENTRE_X, "size": shapes.RADIUS}  # what the data draws from


@dataclass(frozen=True)
class Render:
    steps: int = 25
    guidance: float = 5.0
    high_noise_fraction: float = 0.8  # base denoises to here, the refiner the rest (SDXL's ensemble of experts)
    batch: int = 16


def check_scenes(n: int, seed: int = 0, partial: bool = False) -> list[shapes.Scene]:
    """n random scenes whose captions name every attribute, or (`partial`) some but not all of them."""
    found, index = [], 0
    while len(found) < n:
        scene = shapes.scene_for(10_000 + seed, index, drop_words=partial)
        index += 1
        named = len(scene.named_in_caption)
        if (partial and 0 < named < len(shapes.ATTRIBUTES)) or (not partial and named == len(shapes.ATTRIBUTES)):
            found.append(scene)
    return found


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


def agreement(seen_all: list[shapes.Description], scenes: list[shapes.Scene]) -> dict:
    """Per attribute, the share of renders whose caption names it that show it; plus colour+position+size."""
    hits = {a: [] for a in ATTRIBUTES} | {"agreement": []}
    for seen, scene in zip(seen_all, scenes, strict=True):
        right = {a: getattr(seen, a) == getattr(scene, a) for a in scene.named_in_caption}
        for a, ok in right.items():
            hits[a].append(ok)
        if len(right) == len(ATTRIBUTES):
            hits["agreement"].append(right["colour"] and right["position"] and right["size"])
    return {k: round(float(np.mean(v)), 3) if v else None for k, v in hits.items()}


def variation(seen_all: list[shapes.Description], scenes: list[shapes.Scene], seeds: int) -> dict:
    """Per attribute left out of a prompt: the share of prompts whose `seeds` renders show 2+ of its words."""
    varied = {a: [] for a in ("colour", "position", "size")}
    for i in range(0, len(scenes), seeds):
        seen = seen_all[i : i + seeds]
        for a in varied:
            if a not in scenes[i].named_in_caption:
                varied[a].append(len({getattr(d, a) for d in seen if d.shape is not None}) > 1)
    return {a: round(float(np.mean(v)), 3) if v else None for a, v in varied.items()}


def largest_gap(values: list[float], low: float, high: float, circular: bool = False) -> float:
    """The widest stretch of [low, high) that no value falls in, as a share of it; on a circle (hue) it wraps."""
    span, v = high - low, np.asarray(values, dtype=float)
    if v.size == 0:
        return 1.0
    v = np.sort((v - low) % span if circular else np.clip(v, low, high) - low)
    edges = np.concatenate([v, [v[0] + span]]) if circular else np.concatenate([[0.0], v, [span]])
    return float(np.diff(edges).max() / span)


def uniform_gap(n: int, circular: bool = False) -> float:
    """The expected `largest_gap` of n uniform draws: what a model that varies as its data does would leave."""
    k = n if circular else n + 1  # n points cut a circle into n stretches, an interval into n + 1
    return float(sum(1.0 / i for i in range(1, k + 1)) / k)


def gaps(seen_all: list[shapes.Description], scenes: list[shapes.Scene], seeds: int) -> dict:
    """Per attribute left out of a prompt: the median over prompts of the `largest_gap` its `seeds` renders leave
    (hue on the wheel, centre x and radius on the data's ranges), beside `uniform_gap` for as many draws."""
    found = {a: [] for a in SPANS}
    for i in range(0, len(scenes), seeds):
        seen = [d for d in seen_all[i : i + seeds] if d.shape is not None]
        for a, (low, high) in SPANS.items():
            if a not in scenes[i].named_in_caption and seen:
                values = [getattr(d, shapes.FIELD[a]) for d in seen]
                found[a].append((largest_gap(values, low, high, a == "colour"), len(values)))
    report = {}
    for a, rows in found.items():
        if rows:
            report[a] = {
                "gap": round(float(np.median([g for g, _ in rows])), 3),
                "if_uniform": round(float(np.median([uniform_gap(n, a == "colour") for _, n in rows])), 3),
            }
    return report


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
    """(report, images): full and partial captions, `prompts` each × `seeds` seeds, plus `empty` renders of ""."""
    report, everything = {}, []
    for kind in ("full", "partial"):
        scenes = [s for s in check_scenes(prompts, partial=kind == "partial") for _ in range(seeds)]
        seed_list = [k for _ in range(prompts) for k in range(seeds)]
        images = render(base, refiner, [s.caption for s in scenes], seed_list, cfg)
        seen = [shapes.describe(_at_128(image)) for image in images]  # read once, for every measure below
        report[kind] = agreement(seen, scenes)
        if kind == "partial":
            report["varies"] = variation(seen, scenes, seeds)
            report["left_out_gap"] = gaps(seen, scenes, seeds)
        everything += images
    blank = render(base, refiner, [""] * empty, list(range(empty)), cfg)
    report["agreement"] = report["full"].pop("agreement")
    report["partial"].pop("agreement")
    report["empty_prompt_sane"] = round(sum(map(sane, blank)) / max(empty, 1), 3)
    report["renders"] = len(everything) + len(blank)
    return report, everything + blank


def main(argv: list[str] | None = None) -> None:
    import argparse

    from loratool.sdxl.models import load_models, pick_runtime

    p = argparse.ArgumentParser(prog="python -m loratool.demo.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the demo base folder")
    p.add_argument("--refiner", default=None, help="the demo refiner folder (omit for base only)")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (2+ to see what varies)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default=None)
    p.add_argument("--sheet", default=None, help="save all renders as one PNG here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    libraries.quiet()  # our INFO lines only: the root level would let every library's chatter through
    runtime = pick_runtime(a.device)
    base, refiner = load_models(a.model, a.refiner, runtime, vae="base")  # the demo's own VAE, never the fp16-fix
    report, images = check(base, refiner, a.prompts, a.seeds, cfg=Render(steps=a.steps, guidance=a.guidance))
    if a.sheet:
        contact_sheet(images).save(a.sheet)
        log.info("contact sheet: %s", a.sheet)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
