"""Slider sweeps without torch: which scales, what the files are called, and how much each scale changed.

The metric mirrors Concept Sliders' evaluation (distance to the scale-0 image over a range of scales),
with a mean absolute pixel change instead of LPIPS so it needs no extra model.
"""

from __future__ import annotations

import math

from loratool.errors import InputError


def slider_scales(text: str, points: int) -> list[float]:
    """`A..B` with `points` evenly spaced values; 0 is inserted when A < 0 < B and the spacing misses it."""
    if points < 1:
        raise InputError(f"--points must be at least 1, not {points}.")
    try:
        low, high = (float(x) for x in text.split(".."))
    except ValueError:
        raise InputError(f"--slider takes A..B (for example -1..1), not {text!r}.") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise InputError(f"--slider A..B needs finite A < B, not {text!r}.")
    if points == 1:
        scales = [(low + high) / 2]
    else:
        scales = [low + (high - low) * i / (points - 1) for i in range(points)]
    scales = [round(s, 10) + 0.0 for s in scales]  # -0.0 → 0.0, and 0.1*3 noise away
    if low < 0 < high and 0.0 not in scales:
        scales = sorted([*scales, 0.0])
    return scales


def requested(slider: str | None, points: int, values: str | None) -> list[float]:
    """The scales the flags ask for: --values as given, else --slider (default -1..1) with --points."""
    if values is not None and slider is not None:
        raise InputError("give --slider A..B or --values v1,v2,…, not both.")
    return value_scales(values) if values is not None else slider_scales(slider or "-1..1", points)


def value_scales(text: str) -> list[float]:
    """`--values 0,-2,2` → the scales in the order given; duplicates are an error."""
    try:
        scales = [float(v) + 0.0 for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--values takes comma-separated numbers, not {text!r}.") from None
    if not scales or not all(math.isfinite(s) for s in scales):
        raise InputError(f"--values needs at least one finite number, not {text!r}.")
    if len(set(scales)) != len(scales):
        raise InputError(f"--values lists a scale twice: {text!r}.")
    return scales


def scale_labels(scales: list[float]) -> list[str]:
    """Two decimals unless that would give two scales the same file name."""
    for digits in range(2, 8):
        labels = [f"{s:.{digits}f}" for s in scales]
        if len(set(labels)) == len(labels):
            return labels
    raise InputError("scales differ by less than 1e-7: pick scales further apart.")


def image_name(seed: int, label: str) -> str:
    return f"seed{seed}_scale{label}.png"


def mean_abs_change(image, reference) -> float:
    """Mean |Δ| over all pixels and channels, in [0, 1] (images as uint8 arrays or PIL images)."""
    import numpy as np

    a = np.asarray(image, dtype=np.float64) / 255.0
    b = np.asarray(reference, dtype=np.float64) / 255.0
    return float(np.abs(a - b).mean())


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on tie-averaged ranks); None when either side is constant."""
    if len(x) != len(y):
        raise ValueError("spearman needs two lists of the same length")
    rx, ry = _ranks(x), _ranks(y)
    n = len(x)
    mx, my = sum(rx) / n if n else 0.0, sum(ry) / n if n else 0.0
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def seed_metrics(scales: list[float], changes: list[float]) -> dict:
    """Per-seed entry of sweep.json: change vs scale 0 at each scale and its rank correlation with |scale|."""
    return {
        "mean_abs_change": dict(zip(scale_labels(scales), changes, strict=True)),
        "spearman_abs_scale_vs_change": spearman([abs(s) for s in scales], changes),
    }
