"""Write a sample of the demo model's training scenes to disk: PNGs, one caption .txt each, and concept pairs.

    python datasets/make_shapes.py --out shapes_sample --count 64 --seed 0

The generator lives in the package (`loratool.demo.shapes`), so the demo build and this sample draw the same
scenes: image i of seed s here is image i of seed s in training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loratool.demo import shapes


def write_sample(out: Path, count: int, seed: int, pairs: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = shapes.scene_for(seed, i)
        shapes.render(scene).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(scene.caption + "\n")
    for concept in shapes.CONCEPTS:
        for k in range(pairs):
            a, b, scene_a, scene_b = shapes.concept_pair(concept, seed + k)
            folder = out / "pairs" / concept
            folder.mkdir(parents=True, exist_ok=True)
            for tag, image, scene in (("a", a, scene_a), ("b", b, scene_b)):
                image.save(folder / f"{k:03d}_{tag}.png")
                (folder / f"{k:03d}_{tag}.txt").write_text(scene.caption + "\n")
    return {"out": str(out), "images": count, "pairs_per_concept": pairs, "seed": seed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=4, help="pairs per concept (size, colour, position)")
    a = p.parse_args()
    print(json.dumps(write_sample(a.out, a.count, a.seed, a.pairs)))


if __name__ == "__main__":
    main()
