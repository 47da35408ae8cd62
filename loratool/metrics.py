"""Measures shared by every verb, as pure functions: image similarity (PSNR, SSIM, mean absolute change) and the
statistics of a series measured across a sweep (Spearman, monotone growth, the largest jump's share).

PSNR and SSIM take [0, 1] torch images shaped (C, H, W) or (N, C, H, W) and return one value per image (a 0-d
tensor for a single image). SSIM follows Wang et al. 2004: 11×11 Gaussian window with σ = 1.5, K1 = 0.01,
K2 = 0.03, 'valid' filtering, mean over channels. torch and numpy are imported inside the functions that use
them: `loratool sample` imports this module while it is still checking flags, before it needs either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _batched(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    single = a.ndim == 3
    if single:
        a, b = a[None], b[None]
    return a.double(), b.double(), single


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """10·log10(1 / MSE); +inf for identical images."""
    import torch

    a, b, single = _batched(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    value = 10 * torch.log10(1.0 / mse)  # mse = 0 gives +inf, which is the right answer
    return value[0] if single else value


def _gaussian_window(channels: int, dtype: torch.dtype) -> torch.Tensor:
    import torch

    x = torch.arange(WINDOW, dtype=dtype) - (WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, WINDOW, WINDOW).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity; 1 for identical images."""
    import torch.nn.functional as F

    a, b, single = _batched(a, b)
    c = a.shape[1]
    if min(a.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}×{WINDOW} px")
    w = _gaussian_window(c, a.dtype)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=c)  # depthwise: every channel filtered on its own

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = K1**2, K2**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    value = (num / den).flatten(1).mean(1)
    return value[0] if single else value


def mean_abs_change(image, reference) -> float:
    """Mean |Δ| over all pixels and channels, in [0, 1] (images as uint8 arrays or PIL images)."""
    import numpy as np

    a = np.asarray(image, dtype=np.float64) / 255.0
    b = np.asarray(reference, dtype=np.float64) / 255.0
    return float(np.abs(a - b).mean())


def _ranks(values: Sequence[float]) -> list[float]:
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


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
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


def grows(values: Sequence[float]) -> bool | None:
    """True when each value is at least the one before and the last exceeds the first (a flat series does not
    grow); None for fewer than two values, where there is nothing to compare."""
    if len(values) < 2:
        return None
    return all(b >= a for a, b in pairwise(values)) and values[-1] > values[0]


def largest_share(jumps: Sequence[float]) -> float | None:
    """The largest of several non-negative jumps as a share of their sum, in [1/len, 1]; None when they sum to 0.

    Over the steps of a sweep, 1/len is an even glide and 1 a switch that happens in one step.
    """
    if any(j < 0 or not math.isfinite(j) for j in jumps):
        raise ValueError(f"jumps must be finite and non-negative, not {list(jumps)}")
    total = sum(jumps)
    return max(jumps) / total if total > 0 else None


def largest_jump_share(values: Sequence[float]) -> float | None:
    """`largest_share` of the jumps |v[k+1] − v[k]| of a series measured at sorted scales: 1/(n−1) for a linear
    ramp, 1 for a step; None when the series is constant (or shorter than 2) and so has no jump to share."""
    return largest_share([abs(b - a) for a, b in pairwise(values)])
