"""Which scales a sweep renders and what their files are called (the flags --slider, --points, --values)."""

from __future__ import annotations

import math

from loratool.errors import InputError

MAX_SCALES = 100  # each scale is one render per seed: 100 000 would run for days without a word


def slider_scales(text: str, points: int) -> list[float]:
    """`A..B` with `points` evenly spaced values; 0 is inserted when A < 0 < B and the spacing misses it."""
    if not 1 <= points <= MAX_SCALES:
        raise InputError(f"--points must be between 1 and {MAX_SCALES} (one render per seed each), not {points}.")
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


def requested(slider: str | None, points: int | None, values: str | None) -> list[float]:
    """The scales the flags ask for: --values as given, else --slider (default -1..1) with --points (default 5)."""
    if values is not None and slider is not None:
        raise InputError("give --slider A..B or --values v1,v2,…, not both.")
    if values is not None:
        return value_scales(values)
    return slider_scales(slider or "-1..1", 5 if points is None else points)


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
    if len(scales) > MAX_SCALES:
        raise InputError(f"--values lists {len(scales)} scales; at most {MAX_SCALES} (one render per seed each).")
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
