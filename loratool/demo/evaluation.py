"""How well a slider slides on the demo model: the concept's attribute on every render, and what else changed.

Each render of a sweep is read back with `shapes.describe`. The concept's attribute is placed on the pair's
own scale (`shapes.progress`: 0 = the minus image, 1 = the plus image; a hue along the arc of the wheel that
passes through the seed's scale-0 render), so every concept and direction reads the same way:
- Spearman(scale, progress) per seed: does the slider move the right way at every step;
- glide: the largest jump between neighbouring scales as a share of all of them (0.25 is an even glide over
  five scales, 1.0 a switch);
- span: mean progress at the highest scale minus at the lowest (1.0 = the pair's whole difference);
- kept: the share of renders (scale ≠ 0) whose other attributes match the same seed's scale-0 render.
"""

from __future__ import annotations

import math

import numpy as np

from loratool.demo import shapes
from loratool.metrics import largest_jump_share, spearman

# What counts as "the same" when a slider should not touch an attribute: about a caption word's worth less.
KEEP_RADIUS_RATIO = 1.25
KEEP_HUE_DEGREES = 25.0
KEEP_CX_PX = 8.0


def kept(seen: shapes.Description, reference: shapes.Description, concept: str) -> bool:
    """Whether every attribute other than `concept` (and the shape kind) matches the reference render."""
    if seen.shape is None or reference.shape is None or seen.shape != reference.shape:
        return False
    same = {
        "size": max(seen.radius, reference.radius) <= KEEP_RADIUS_RATIO * max(min(seen.radius, reference.radius), 1e-6),
        "colour": abs(shapes.hue_difference(seen.hue, reference.hue)) <= KEEP_HUE_DEGREES,
        "position": abs(seen.cx - reference.cx) <= KEEP_CX_PX,
    }
    return all(ok for attribute, ok in same.items() if attribute != concept)


def _attribute(seen: shapes.Description, concept: str) -> float:
    if seen.shape is None:
        return math.nan
    return {"size": float(seen.area), "colour": seen.hue, "position": seen.cx}[concept]


def evaluate(images: dict, scales: list[float], seeds: list[int], concept: str, pair: tuple[float, float]) -> dict:
    """Per seed and summarised: progress at each scale, Spearman, glide and kept, for renders {(seed, scale): image}.

    `pair` is the concept's measured value on the (minus, plus) images. A render with no shape has no
    progress; its seed's Spearman and glide count as failures (0 and 1) in the means.
    """
    order = sorted(range(len(scales)), key=scales.__getitem__)
    ordered = [scales[i] for i in order]
    per_seed = {}
    for seed in seeds:
        seen = {s: shapes.describe(images[(seed, s)]) for s in scales}
        via = seen[0.0].hue if 0.0 in seen and seen[0.0].shape is not None else None  # colour: which arc
        progress = [shapes.progress(_attribute(seen[s], concept), concept, *pair, via=via) for s in ordered]
        finite = all(math.isfinite(p) for p in progress)
        rho = spearman(ordered, progress) if finite else None
        per_seed[str(seed)] = {
            "progress": [round(p, 4) for p in progress],
            "spearman": rho,
            "glide": largest_jump_share(progress) if finite else None,
            "kept": [kept(seen[s], seen[0.0], concept) for s in ordered if s != 0.0] if 0.0 in seen else [],
        }
    return {"scales": ordered, "per_seed": per_seed, "summary": summarise(per_seed)}


def summarise(per_seed: dict) -> dict:
    rows = list(per_seed.values())
    rho = [r["spearman"] if r["spearman"] is not None else 0.0 for r in rows]
    glide = [r["glide"] if r["glide"] is not None else 1.0 for r in rows]
    progress = np.array([r["progress"] for r in rows], dtype=float)
    flags = [k for r in rows for k in r["kept"]]
    return {
        "mean_spearman": round(float(np.mean(rho)), 4),
        "mean_glide": round(float(np.mean(glide)), 4),
        "span": round(float(np.nanmean(progress[:, -1]) - np.nanmean(progress[:, 0])), 4),
        "kept": round(float(np.mean(flags)), 4) if flags else None,
    }
