"""Training images: loading with clear errors, SDXL aspect buckets, micro-conditioning, slider pairs.

SDXL was trained on buckets (multiples of 64, area about resolution²) and conditioned on the image's
real size and crop; giving it the true numbers keeps a copy-machine LoRA from learning "this is a crop".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from loratool.errors import InputError

log = logging.getLogger(__name__)

MIN_SIDE = 64
BUCKET_STEP = 64
PAIR_WARN_SHARE = 0.5
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # how PIL opens a 16-bit greyscale PNG (0..65535)


@dataclass(frozen=True)
class TrainImage:
    """One image ready for the VAE, with SDXL's micro-conditioning (all (h, w) / (top, left) pairs)."""

    path: Path
    pixels: object  # torch.Tensor (3, h, w) in [-1, 1]; loose type keeps torch out of imports
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def time_ids(self) -> list[int]:
        """SDXL's add_time_ids order: original size, crop top-left, target size."""
        return [*self.original_size, *self.crop_top_left, *self.target_size]


def load_image(path: Path):
    """An RGB PIL image: alpha flattened on white, grayscale (8- or 16-bit) and palette expanded."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file.")
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path} is not an image loratool can read (PNG, JPEG, WebP…): {exc}.") from None
    if min(img.size) < MIN_SIDE:
        raise InputError(f"{path} is {img.width}×{img.height} px; training needs at least {MIN_SIDE} px per side.")
    if img.mode in SIXTEEN_BIT:  # convert("RGB") clips 16-bit grey at 255: a mid-grey photo turns white
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def buckets(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets: multiples of 64, area ≤ resolution², aspect ratios from 1:4 to 4:1."""
    found = set()
    for w in range(BUCKET_STEP, 4 * resolution + 1, BUCKET_STEP):
        h = (resolution * resolution // w) // BUCKET_STEP * BUCKET_STEP
        if h >= BUCKET_STEP and max(w, h) <= 4 * min(w, h):
            found |= {(w, h), (h, w)}
    return sorted(found)


def pick_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to the image's; larger area breaks ties."""
    target = math.log(width / height)
    return min(buckets(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def prepare(path: Path, resolution: int) -> TrainImage:
    """Load, resize to cover the bucket, center-crop, and record the real micro-conditioning numbers."""
    import numpy as np
    import torch
    from PIL import Image

    img = load_image(path)
    bw, bh = pick_bucket(img.width, img.height, resolution)
    scale = max(bw / img.width, bh / img.height)
    # ceil, so rounding never leaves the resized image a pixel short of the bucket
    rw, rh = max(bw, math.ceil(img.width * scale - 1e-6)), max(bh, math.ceil(img.height * scale - 1e-6))
    if (rw, rh) != img.size:
        img_resized = img.resize((rw, rh), Image.Resampling.LANCZOS)
    else:
        img_resized = img
    left, top = (rw - bw) // 2, (rh - bh) // 2
    crop = img_resized.crop((left, top, left + bw, top + bh))
    array = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return TrainImage(
        path=Path(path),
        pixels=pixels,
        original_size=(img.height, img.width),
        crop_top_left=(top, left),
        target_size=(bh, bw),
    )


@dataclass(frozen=True)
class PairDifference:
    """How much of a slider pair differs: share of pixels and the (left, top, right, bottom) box, or None."""

    share: float
    bbox: tuple[int, int, int, int] | None


def compare_pair(a: Path, b: Path) -> PairDifference:
    """Check a slider pair: same size required; warn when most pixels differ (not the same scene)."""
    import numpy as np

    img_a, img_b = load_image(a), load_image(b)
    if img_a.size != img_b.size:
        raise InputError(
            f"--pair images must have the same size: {a} is {img_a.width}×{img_a.height}, "
            f"{b} is {img_b.width}×{img_b.height}."
        )
    differs = (np.asarray(img_a) != np.asarray(img_b)).any(axis=2)
    share = float(differs.mean())
    bbox = None
    if differs.any():
        rows, cols = np.nonzero(differs.any(axis=1))[0], np.nonzero(differs.any(axis=0))[0]
        bbox = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    log.info("pair: %.1f %% of pixels differ, box (left, top, right, bottom) %s", 100 * share, bbox)
    if share > PAIR_WARN_SHARE:
        log.warning(
            "warning: %.0f %% of the pixels of %s and %s differ; a slider pair should differ only in the concept.",
            100 * share,
            a,
            b,
        )
    return PairDifference(share, bbox)


def turn_hue(pixels, degrees: float):
    """(3, h, w) RGB in [-1, 1] with every hue turned by `degrees` round the colour wheel; saturation and value
    (the brightest channel) stay as they were, so greys, black and white do not change. Pure: torch in, out."""
    import torch

    x = (pixels.float() + 1.0) / 2.0
    r, g, b = x
    value, _ = x.max(dim=0)
    chroma = value - x.min(dim=0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sector = torch.where(
        value == r, ((g - b) / safe) % 6.0, torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    hue = (torch.where(chroma > 0, sector, torch.zeros_like(sector)) + degrees / 60.0) % 6.0
    # HSV back to RGB without branches: channel n is value − chroma·clamp(min(k, 4 − k), 0, 1), k = (n + hue) mod 6
    turned = [
        value - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0) for k in ((n + hue) % 6.0 for n in (5, 3, 1))
    ]
    return (torch.stack(turned) * 2.0 - 1.0).to(pixels.dtype)
