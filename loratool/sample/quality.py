"""How far each scale of a sweep moved the render from the scale-0 render, per seed.

The distance is the mean absolute pixel change. It mirrors Concept Sliders' evaluation (distance to the
scale-0 image over a range of scales) with no perceptual model: LPIPS would need a weight download.
"""

from __future__ import annotations

import logging

from loratool.metrics import mean_abs_change, spearman
from loratool.sample.scales import scale_labels

log = logging.getLogger(__name__)


def measure(scales: list[float], seeds: list[int], images: dict) -> dict:
    """sweep.json's per-seed metrics from {(seed, scale): image}, which holds scale 0 whether swept or not."""
    result = {}
    for seed in seeds:
        changes = [mean_abs_change(images[(seed, s)], images[(seed, 0.0)]) for s in scales]
        result[str(seed)] = seed_metrics(scales, changes)
    return result


def seed_metrics(scales: list[float], changes: list[float]) -> dict:
    """Per-seed entry of sweep.json: change vs scale 0 at each scale and its rank correlation with |scale|."""
    return {
        "mean_abs_change": dict(zip(scale_labels(scales), changes, strict=True)),
        "spearman_abs_scale_vs_change": spearman([abs(s) for s in scales], changes),
    }


def log_table(scales: list[float], per_seed: dict) -> None:
    """Mean |Δpixel| vs scale 0 (×1000) per scale, and Spearman(|scale|, Δ), one row per seed, on stderr."""
    log.info("mean |Δ| vs scale 0 (×1000)")
    log.info("%8s " + " ".join(f"{x:>8}" for x in scale_labels(scales)) + " %9s", "seed", "spearman")
    for seed, m in per_seed.items():
        row = " ".join(f"{1000 * v:8.2f}" for v in m["mean_abs_change"].values())
        rho = m["spearman_abs_scale_vs_change"]
        log.info("%8s %s %9s", seed, row, "n/a" if rho is None else f"{rho:.3f}")
