"""How well a sweep slides, for any model and any LoRA: per seed, how far each scale moved the render away from
the scale-0 render, whether that change grows with |scale| on each side of 0, and the glide — the largest jump
between renders at neighbouring swept scales (as the sheet shows them) as a share of all those jumps: 1/(n−1)
is an even glide over n scales, 1 a switch.

The distance is the mean absolute pixel change throughout. It mirrors Concept Sliders' evaluation (distance to
the scale-0 image over a range of scales) with no perceptual model: LPIPS would need a weight download.
"""

from __future__ import annotations

import logging
from itertools import pairwise

from loratool.metrics import grows, largest_share, mean_abs_change, spearman
from loratool.sample.scales import scale_labels

log = logging.getLogger(__name__)

SIDES = {"negative": lambda s: s < 0, "positive": lambda s: s > 0}


def measure(scales: list[float], seeds: list[int], images: dict) -> dict:
    """sweep.json's per-seed metrics from {(seed, scale): image}, which holds scale 0 whether swept or not."""
    ordered = sorted(scales)
    result = {}
    for seed in seeds:
        changes = [mean_abs_change(images[(seed, s)], images[(seed, 0.0)]) for s in scales]
        jumps = [mean_abs_change(images[(seed, a)], images[(seed, b)]) for a, b in pairwise(ordered)]
        result[str(seed)] = seed_metrics(scales, changes, jumps)
    return result


def seed_metrics(scales: list[float], changes: list[float], jumps: list[float]) -> dict:
    """One seed: `changes` vs scale 0 in the order of `scales`, `jumps` between neighbours of sorted(scales)."""
    labels = dict(zip(scales, scale_labels(scales), strict=True))
    change = dict(zip(scales, changes, strict=True))
    steps = [f"{labels[a]}..{labels[b]}" for a, b in pairwise(sorted(scales))]
    return {
        "mean_abs_change": {labels[s]: change[s] for s in scales},
        "spearman_abs_scale_vs_change": spearman([abs(s) for s in scales], changes),
        "change_grows": {side: _grows_on(side, change) for side in SIDES},
        "neighbour_change": dict(zip(steps, jumps, strict=True)),
        "glide": largest_share(jumps),
    }


def _grows_on(side: str, change: dict[float, float]) -> bool | None:
    """Change grows outward from scale 0 (where it is 0) on one side; None when no scale lies on that side."""
    outward = sorted((s for s in change if SIDES[side](s)), key=abs)
    return grows([0.0, *(change[s] for s in outward)]) if outward else None


def summarise(scales: list[float], per_seed: dict) -> dict:
    """Means across seeds, and on how many seeds the change grows on each swept side (and on all of them)."""
    rows = list(per_seed.values())
    sides = [side for side in SIDES if any(SIDES[side](s) for s in scales)]
    grows_on = {side: sum(bool(m["change_grows"][side]) for m in rows) for side in sides}
    grows_on["all_sides"] = sum(all(m["change_grows"][side] for side in sides) for m in rows) if sides else 0
    return {
        "seeds": len(rows),
        "mean_glide": _mean(m["glide"] for m in rows),
        "even_glide": 1 / (len(scales) - 1) if len(scales) > 1 else None,
        "change_grows_on_seeds": grows_on,
        "mean_spearman_abs_scale_vs_change": _mean(m["spearman_abs_scale_vs_change"] for m in rows),
        "mean_abs_change": {label: _mean(m["mean_abs_change"][label] for m in rows) for label in scale_labels(scales)},
    }


def _mean(values) -> float | None:
    """Mean of the values that are not None; None when there are none (JSON null, never NaN)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summary_line(summary: dict) -> str:
    """One line for stderr, e.g. `slider: mean glide 0.31 (even = 0.25), change grows with |scale| on both
    sides on 4/4 seeds, Spearman 0.98`."""
    glide, even = summary["mean_glide"], summary["even_glide"]
    if glide is not None:
        parts = [f"slider: mean glide {glide:.2f}" + ("" if even is None else f" (even = {even:.2f})")]
    else:  # one swept scale has no neighbours; several with identical renders have no change between them
        why = "one scale swept" if even is None else "no change between neighbouring scales"
        parts = [f"slider: mean glide n/a ({why})"]
    counts = dict(summary["change_grows_on_seeds"])
    every = counts.pop("all_sides")
    if counts:
        where = "both sides" if len(counts) == 2 else f"the {next(iter(counts))} side"
        parts.append(f"change grows with |scale| on {where} on {every}/{summary['seeds']} seeds")
    rho = summary["mean_spearman_abs_scale_vs_change"]
    parts.append("Spearman n/a" if rho is None else f"Spearman {rho:.2f}")
    return ", ".join(parts)


def log_table(scales: list[float], per_seed: dict) -> None:
    """Mean |Δpixel| vs scale 0 (×1000) per scale, Spearman(|scale|, Δ) and glide, one row per seed."""
    log.info("mean |Δ| vs scale 0 (×1000)")
    log.info("%8s " + " ".join(f"{x:>8}" for x in scale_labels(scales)) + " %9s %6s", "seed", "spearman", "glide")
    for seed, m in per_seed.items():
        row = " ".join(f"{1000 * v:8.2f}" for v in m["mean_abs_change"].values())
        rho, glide = m["spearman_abs_scale_vs_change"], m["glide"]
        log.info("%8s %s %9s %6s", seed, row, _fmt(rho, 3), _fmt(glide, 2))


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
