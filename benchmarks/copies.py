"""Copy-machine fidelity on held-out scenes of the demo model: one JSON line per variant.

    python benchmarks/copies.py --images 6 --seeds 8 --steps 600 [--variant default --variant pure_noise=0 ...]
        [--weights DIR]   # another demo model (base/, refiner/) instead of the shipped one

Draws `--images` random scenes (never the demo's pairs; seeded by --draw-seed), trains a copy LoRA of each with
copy mode's defaults plus the variant's settings (`name=value` pairs of TrainConfig fields; `default` changes
nothing), then renders the empty prompt through the base alone with `sample --values 1` (20 steps) on
`--seeds` seeds from `--first-seed` (default 0; the copy checks render seeds 0, 1, …, so a first seed past
them scores only seeds the early stop never saw). Reports per image and overall: mean and min PSNR against
the image, the share of renders whose hue is within 30° of the image's, the step each copy stopped at, and the
wall time of each variant.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from loratool import libraries


def parse_variant(text: str) -> dict:
    if text == "default":
        return {}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        out[key] = json.loads(value)
    return out


def copy_one(image: Path, root: Path, steps: int, seeds: list[int], settings: dict) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from loratool import sample, train
    from loratool.demo import shapes
    from loratool.metrics import psnr

    lora = root / f"{image.stem}.safetensors"
    train.run(train.TrainConfig(images=[image], output=lora, model="demo", steps=steps, **settings))
    report = json.loads(lora.with_suffix(".report.json").read_text())
    renders = root / f"{image.stem}-renders"
    sample.run(sample.SampleConfig(output=renders, loras=[str(lora)], scales=[1.0], seeds=seeds, steps=20,
                                   model="demo", refiner=None))  # fmt: skip

    def tensor(path: Path) -> torch.Tensor:
        return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)

    target, hue = tensor(image), shapes.describe(Image.open(image).convert("RGB")).hue
    files = [renders / f"seed{s}_scale1.00.png" for s in seeds]
    values = [psnr(tensor(f), target).item() for f in files]
    seen = [shapes.describe(Image.open(f).convert("RGB")).hue for f in files]
    right = [h is not None and abs(shapes.hue_difference(hue, h)) <= 30 for h in seen]
    copy = report.get("copy") or {}
    return {"image": image.name, "mean_psnr": round(float(np.mean(values)), 2), "min_psnr": round(min(values), 2),
            "right_colour": round(float(np.mean(right)), 3), "stopped_at": copy.get("stopped_at")}  # fmt: skip


def run_variant(variant: str, images: list[Path], root: Path, steps: int, seeds: list[int]) -> dict:
    import numpy as np

    start = time.perf_counter()
    folder = root / variant.replace("=", "_").replace(",", "+")
    folder.mkdir()
    rows = [copy_one(image, folder, steps, seeds, parse_variant(variant)) for image in images]
    return {
        "variant": variant,
        "mean_psnr": round(float(np.mean([r["mean_psnr"] for r in rows])), 2),
        "min_psnr": round(min(r["min_psnr"] for r in rows), 2),
        "right_colour": round(float(np.mean([r["right_colour"] for r in rows])), 3),
        "seconds": round(time.perf_counter() - start, 1),
        "images": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=0, help="render seeds from here on (copy checks draw 0, 1, …)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--draw-seed", type=int, default=2026, help="which held-out scenes (not the demo's pairs)")
    p.add_argument("--variant", action="append", default=None, help="'default' or name=value[,name=value]")
    p.add_argument("--weights", type=Path, default=None, help="demo model folder to use instead of the shipped one")
    a = p.parse_args()
    libraries.quiet()  # only the results and our own progress on stdout/stderr
    import torch

    from loratool.demo import shapes
    from loratool.sdxl import models

    if a.weights is not None:
        models.DEMO_WEIGHTS = a.weights.resolve()

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = []
        for i in range(a.images):
            path = root / f"held_out_{i}.png"
            shapes.render(shapes.scene_for(a.draw_seed, i, drop_words=False)).save(path)
            images.append(path)
        for variant in a.variant or ["default"]:
            row = run_variant(variant, images, root, a.steps, list(range(a.first_seed, a.first_seed + a.seeds)))
            weights = str(a.weights) if a.weights else "shipped"
            line = {"benchmark": "copies", "weights": weights, "steps": a.steps, "seeds": a.seeds}
            line = line | {"first_seed": a.first_seed, "draw_seed": a.draw_seed} | row
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
