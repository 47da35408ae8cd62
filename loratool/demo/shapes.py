"""Seeded scenes of one flat shape on a plain background, their captions, concept pairs and measurements.

Simple on purpose: a ~3 M-parameter UNet must learn them in minutes. Every caption word is a single token of
the tiny tokenizer (`loratool.sdxl.tiny.DEFAULT_WORDS`). Shapes are drawn at 4x and box-filtered down, so
edges are anti-aliased (easier for a x8 VAE) and rendering stays deterministic.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (24, 24, 24)}
RADII = {"small": 14, "large": 30}  # half the side of the bounding square, at SIZE px
CENTRES_X = {"left": 34, "center": 64, "right": 94}
JITTER = 4  # px of random offset in x and y, and of radius
CONCEPTS = ("size", "colour", "position")
SMALL_LARGE_AREA = 1300  # px: between the largest small shape (~1,000) and the smallest large one (~1,570)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str = "white"
    dx: int = 0  # jitter of the centre, px
    dy: int = 0
    dr: int = 0  # jitter of the radius, px

    @property
    def caption(self) -> str:
        return self.caption_without(None)

    def caption_without(self, concept: str | None) -> str:
        """The caption minus one attribute's words: the context in which a slider of that concept is swept."""
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        words = {"size": self.size, "colour": self.colour, "shape": self.shape, "position": where}
        text = " ".join(["a", *(w for k, w in words.items() if k != concept)])
        return text if self.background == "white" else f"{text} with a {self.background} background"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Bounding box (x0, y0, x1, y1) in output pixels, inclusive of anti-aliased edges."""
        cx, cy, r = CENTRES_X[self.position] + self.dx, SIZE // 2 + self.dy, RADII[self.size] + self.dr
        return cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1


@dataclass(frozen=True)
class Description:
    """What `describe` sees in an image: the dominant shape colour, its area (px), centroid and shape kind.

    `fill` is the area over the bounding box's: ~1 square, ~0.79 circle, ~0.5 triangle, low for scattered noise.
    """

    colour: str | None
    area: int
    cx: float
    cy: float
    shape: str | None
    fill: float = 0.0

    @property
    def size(self) -> str:
        return "large" if self.area >= SMALL_LARGE_AREA else "small"

    @property
    def position(self) -> str:
        return "left" if self.cx < (34 + 64) / 2 else "right" if self.cx > (64 + 94) / 2 else "center"


def random_scene(rng: np.random.Generator, backgrounds: tuple[str, ...] = ("white",)) -> Scene:
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    return Scene(
        shape=pick(SHAPES),
        colour=pick(tuple(COLOURS)),
        size=pick(tuple(RADII)),
        position=pick(tuple(CENTRES_X)),
        background=pick(backgrounds),
        dx=int(rng.integers(-JITTER, JITTER + 1)),
        dy=int(rng.integers(-2 * JITTER, 2 * JITTER + 1)),
        dr=int(rng.integers(-JITTER // 2, JITTER // 2 + 1)),
    )


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image (pure function of `scene`)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy = (CENTRES_X[scene.position] + scene.dx) * s, (SIZE // 2 + scene.dy) * s
    r = (RADII[scene.size] + scene.dr) * s
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r - 1, cy + r - 1)], fill=fill)
    return img.reduce(s)


def scene_for(seed: int, index: int, backgrounds: tuple[str, ...] = ("white",)) -> Scene:
    """Scene `index` of the set `seed`: independent of how many are drawn, so sets can be made in chunks."""
    return random_scene(np.random.default_rng((seed, index)), backgrounds)


def render_many(n: int, seed: int, start: int = 0, backgrounds: tuple[str, ...] = ("white",)):
    """Images `start … start+n-1` of the set `seed` as a uint8 array (n, SIZE, SIZE, 3), plus their scenes."""
    scenes = [scene_for(seed, i, backgrounds) for i in range(start, start + n)]
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = np.asarray(render(scene))
    return out, scenes


def render_pixels(job: tuple[int, int, int]) -> np.ndarray:
    """`render_many(n, seed, start)` pixels only, for a process pool: job = (n, seed, start)."""
    return render_many(*job)[0]


def concept_pair(concept: str, seed: int) -> tuple[Image.Image, Image.Image, Scene, Scene]:
    """Two images identical except for `concept`: size small→large, colour red→blue, position left→right.

    The measure of the second image is the larger one (`measure(b, c) > measure(a, c)`); every pixel outside
    the two shapes' bounding boxes is identical.
    """
    if concept not in CONCEPTS:
        raise ValueError(f"concept must be one of {', '.join(CONCEPTS)}, not {concept!r}")
    field = {"size": "size", "colour": "colour", "position": "position"}[concept]
    values = {"size": ("small", "large"), "colour": ("red", "blue"), "position": ("left", "right")}[concept]
    scene = scene_for(seed, 0)
    a, b = replace(scene, **{field: values[0]}), replace(scene, **{field: values[1]})
    return render(a), render(b), a, b


def _foreground(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask of pixels far from the background (the median border colour), and that colour."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.int16)
    background = np.median(border, axis=0)
    distance = np.abs(pixels.astype(np.int16) - background).max(axis=-1)
    return distance > 60, background


def _hues(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of each row of an (n, 3) uint8 array."""
    return np.array([colorsys.rgb_to_hsv(*(c / 255.0))[0] * 360.0 for c in rgb.reshape(-1, 3)])


def measure(image: Image.Image | np.ndarray, concept: str) -> float:
    """size: shape area (px); colour: circular mean hue (degrees: red 0 < blue ~225); position: centroid x."""
    pixels = np.asarray(image)
    mask, _ = _foreground(pixels)
    if concept == "size":
        return float(mask.sum())
    if not mask.any():
        return float("nan")
    if concept == "position":
        return float(np.nonzero(mask)[1].mean())
    if concept == "colour":
        angles = np.deg2rad(_hues(pixels[mask]))
        return float(np.rad2deg(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360.0)
    raise ValueError(f"concept must be one of {', '.join(CONCEPTS)}, not {concept!r}")


def describe(image: Image.Image | np.ndarray) -> Description:
    """The dominant non-background colour (nearest palette colour), its area, centroid and shape kind."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    mask, _ = _foreground(pixels)
    if mask.sum() < 20:
        return Description(None, int(mask.sum()), float("nan"), float("nan"), None)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    fg = pixels[mask].astype(np.float32)
    nearest = np.linalg.norm(fg[:, None, :] - palette[None], axis=-1).argmin(axis=1)
    colour = list(COLOURS)[int(np.bincount(nearest, minlength=len(palette)).argmax())]
    ys, xs = np.nonzero(mask)
    x0, x1 = np.percentile(xs, (1, 99))
    y0, y1 = np.percentile(ys, (1, 99))
    fill = mask.sum() / max((x1 - x0 + 1) * (y1 - y0 + 1), 1.0)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return Description(colour, int(mask.sum()), float(xs.mean()), float(ys.mean()), shape, float(fill))
