"""Image similarity in pure torch: PSNR and SSIM on [0, 1] images, shaped (C, H, W) or (N, C, H, W).

Both return one value per image (a 0-d tensor for a single image). SSIM follows Wang et al. 2004:
11×11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, 'valid' filtering, mean over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    a, b, single = _batched(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    value = 10 * torch.log10(1.0 / mse)  # mse = 0 gives +inf, which is the right answer
    return value[0] if single else value


def _gaussian_window(channels: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=dtype) - (WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, WINDOW, WINDOW).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity; 1 for identical images."""
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
