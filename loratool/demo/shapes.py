"""Seeded scenes of one flat shape on a plain background, their captions, concept pairs and measurements.

Version 2: size, place and hue are continuous, so a slider has in-between states to glide through; captions
name them in binned words (small/large, left/center/right, the nearest of six colour names) and leave each
word out at random, so the model also learns what to draw for a word left out. Every caption word is one
token of the tiny tokenizer (`loratool.sdxl.tiny.DEFAULT_WORDS`). Shapes are drawn at 4x and box-filtered
down, so edges are anti-aliased (easier for a x8 VAE) and rendering stays deterministic.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": 0.0, "yellow": 55.0, "green": 120.0, "blue": 225.0, "purple": 280.0}  # hue, degrees
SATURATION, VALUE = 0.8, 0.85  # every hue as bright: a colour slider changes hue, not lightness
BACKGROUNDS = {"white": (255, 255, 255), "black": (24, 24, 24)}
RADIUS = (10.0, 34.0)  # half the side of the bounding square, px at SIZE
CENTRE_X = (24.0, 104.0)
CENTRE_Y = (48.0, 80.0)
MARGIN = 2.0  # px between a shape and the frame
# Words for continuous values. Reading an image back (`describe`) splits at the midpoints; a caption names a
# value only when it is clear of them (radius ≤ 19 small, ≥ 25 large; x ≤ 46 left, 56–72 center, ≥ 82 right;
# hue within 8° of half-way to the next name), so no caption contradicts what `describe` would read.
LARGE_FROM = 22.0
LEFT_BELOW, RIGHT_FROM = 51.0, 77.0
CLEAR = {"size": 3.0, "position": 5.0, "colour": 8.0}
ATTRIBUTES = ("size", "colour", "shape", "position")  # in caption order
CONCEPTS = ("size", "colour", "position")
FIELD = {"size": "radius", "colour": "hue", "position": "cx"}  # the Scene field each concept changes
KEEP_WORD = {"size": 0.8, "colour": 0.8, "shape": 0.85, "position": 0.8}  # chance a caption names it
ANCHOR_SHARE = 0.3  # of scenes drawn exactly at a named hue, so the names stay sharp
TRIANGLE_DROP = 0.08  # centroid below the box's middle, share of its height: 1/6 for a triangle, 0 otherwise
SQUARE_CORNERS = 1.14  # reach along the diagonals over along the axes: squares 1.2-1.34, circles 0.94-1.08 (blurred)
SPECK_SHARE = 0.25  # a foreground patch smaller than this share of the largest is a speck, not part of the shape
AREA_PER_RADIUS2 = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
PAIR_GAP = {"size": 12.0, "colour": 90.0, "position": 40.0}  # least difference of a concept pair


def hue_name(hue: float) -> str:
    """The colour name whose hue is nearest on the circle."""
    return min(COLOURS, key=lambda name: abs(hue_difference(COLOURS[name], hue)))


def hue_difference(a: float, b: float) -> float:
    """b − a along the shorter arc, in (−180, 180]."""
    d = (b - a) % 360.0
    return d - 360.0 if d > 180.0 else d


def _clear_of_boundaries(attribute: str, value: float) -> bool:
    if attribute == "size":
        return abs(value - LARGE_FROM) >= CLEAR["size"]
    if attribute == "position":
        return min(abs(value - LEFT_BELOW), abs(value - RIGHT_FROM)) >= CLEAR["position"]
    names = sorted(COLOURS.values())
    halfway = [(a + (b - a) / 2) % 360 for a, b in zip(names, names[1:] + [names[0] + 360], strict=True)]
    return min(abs(hue_difference(h, value)) for h in halfway) >= CLEAR["colour"]


def rgb(hue: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue % 360.0) / 360.0, SATURATION, VALUE)
    return round(255 * r), round(255 * g), round(255 * b)


class Worded:
    """The caption words of a shape's hue, radius and centre x: what a Scene names, what `describe` reads."""

    hue: float | None
    radius: float
    cx: float

    @property
    def colour(self) -> str | None:
        return None if self.hue is None else hue_name(self.hue)

    @property
    def size(self) -> str:
        return "large" if self.radius >= LARGE_FROM else "small"

    @property
    def position(self) -> str:
        return "left" if self.cx < LEFT_BELOW else "right" if self.cx >= RIGHT_FROM else "center"


@dataclass(frozen=True)
class Scene(Worded):
    shape: str
    hue: float  # degrees
    radius: float  # px
    cx: float  # centre, px
    cy: float
    background: str = "white"
    named: tuple[str, ...] = ATTRIBUTES  # the attributes the caption names

    @property
    def nameable(self) -> tuple[str, ...]:
        """The attributes whose value is clear of the word boundaries, so a caption may name them."""
        values = {"size": self.radius, "colour": self.hue, "position": self.cx}
        return tuple(a for a in ATTRIBUTES if a == "shape" or _clear_of_boundaries(a, values[a]))

    @property
    def named_in_caption(self) -> tuple[str, ...]:
        return tuple(a for a in self.named if a in self.nameable)

    @property
    def caption(self) -> str:
        return self.caption_without(None)

    def caption_without(self, concept: str | None) -> str:
        """The caption minus one attribute's words: the context in which a slider of that concept is swept."""
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        words = {"size": self.size, "colour": self.colour, "shape": self.shape, "position": where}
        kept = [w for k, w in words.items() if k in self.named_in_caption and k != concept]
        if not kept:
            return ""
        text = " ".join(["a", *kept])
        return text if self.background == "white" else f"{text} with a {self.background} background"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Bounding box (x0, y0, x1, y1) in output pixels, inclusive of anti-aliased edges."""
        r = self.radius
        return int(self.cx - r) - 1, int(self.cy - r) - 1, int(self.cx + r) + 1, int(self.cy + r) + 1


def _place(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """A centre where a shape of `radius` stays inside the frame."""
    lo_x, hi_x = max(CENTRE_X[0], radius + MARGIN), min(CENTRE_X[1], SIZE - radius - MARGIN)
    lo_y, hi_y = max(CENTRE_Y[0], radius + MARGIN), min(CENTRE_Y[1], SIZE - radius - MARGIN)
    return float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))


def _hue(rng: np.random.Generator) -> float:
    if rng.random() < ANCHOR_SHARE:
        return COLOURS[list(COLOURS)[int(rng.integers(len(COLOURS)))]]
    return float(rng.uniform(0.0, 360.0))


def random_scene(rng: np.random.Generator, backgrounds: tuple[str, ...] = ("white",), drop_words: bool = True) -> Scene:
    """Uniform shape, hue, radius and place; with `drop_words`, each attribute is named with KEEP_WORD's chance."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    hue, radius = _hue(rng), float(rng.uniform(*RADIUS))
    cx, cy = _place(rng, radius)
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    keep = rng.random(len(ATTRIBUTES))  # drawn either way, so a scene's geometry never depends on `drop_words`
    named = tuple(a for a, u in zip(ATTRIBUTES, keep, strict=True) if not drop_words or u < KEEP_WORD[a])
    return Scene(shape, hue, radius, cx, cy, background, named)


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image (pure function of `scene`)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = round(scene.cx * s), round(scene.cy * s), round(scene.radius * s)
    fill = rgb(scene.hue)
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r - 1, cy + r - 1)], fill=fill)
    return img.reduce(s)


def scene_for(seed: int, index: int, backgrounds: tuple[str, ...] = ("white",), drop_words: bool = True) -> Scene:
    """Scene `index` of the set `seed`: independent of how many are drawn, so sets can be made in chunks."""
    return random_scene(np.random.default_rng((seed, index)), backgrounds, drop_words)


def decoy(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with every attribute its caption names drawn afresh (the kind, hue, radius, place), the rest
    as they are: what the remnant of the image in the first steps' noise may show when that noise is a seed's,
    which holds nothing the caption says. A build trains on it so the base takes named words from the caption
    and only what the caption leaves out from the seed (see `loratool.demo.build --decoy`)."""
    named = scene.named_in_caption
    shape = SHAPES[int(rng.integers(len(SHAPES)))] if "shape" in named else scene.shape
    hue = _hue(rng) if "colour" in named else scene.hue
    radius, cx = scene.radius, scene.cx
    if "size" in named:  # what still fits where the shape is (or anywhere across, when the place is redrawn too)
        room = SIZE / 2 if "position" in named else min(cx, SIZE - cx)
        fit = min(room, scene.cy, SIZE - scene.cy) - MARGIN
        radius = float(rng.uniform(RADIUS[0], max(RADIUS[0], min(RADIUS[1], fit))))
    if "position" in named:
        lo, hi = max(CENTRE_X[0], radius + MARGIN), min(CENTRE_X[1], SIZE - radius - MARGIN)
        cx = float(rng.uniform(lo, hi))
    return replace(scene, shape=shape, hue=hue, radius=radius, cx=cx)


def render_many(n: int, seed: int, start: int = 0, backgrounds: tuple[str, ...] = ("white",), decoys: bool = False):
    """Images `start … start+n-1` of the set `seed` as a uint8 array (n, SIZE, SIZE, 3), plus their scenes;
    with `decoys`, each scene's `decoy` (drawn from its own seed, so independent of chunking) instead."""
    scenes = [scene_for(seed, i, backgrounds) for i in range(start, start + n)]
    if decoys:
        scenes = [decoy(s, np.random.default_rng((seed, i, 1))) for i, s in enumerate(scenes, start)]
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = np.asarray(render(scene))
    return out, scenes


def render_pixels(job: tuple[int, int, int, bool]) -> np.ndarray:
    """`render_many(n, seed, start, decoys=…)` pixels only, for a process pool: job = (n, seed, start, decoys)."""
    n, seed, start, decoys = job
    return render_many(n, seed, start, decoys=decoys)[0]


def _pair_values(concept: str, rng: np.random.Generator) -> tuple[float, float]:
    """Two values of the concept at least PAIR_GAP apart, in a random order."""
    gap = PAIR_GAP[concept]
    if concept == "colour":
        a = _hue(rng)
        return a, (a + float(rng.choice([-1.0, 1.0])) * float(rng.uniform(gap, 150.0))) % 360.0
    lo, hi = RADIUS if concept == "size" else (CENTRE_X[0] + 6.0, CENTRE_X[1] - 6.0)
    a = float(rng.uniform(lo, hi - gap))
    b = float(rng.uniform(a + gap, hi))
    return (a, b) if rng.random() < 0.5 else (b, a)


def concept_pair(concept: str, seed: int) -> tuple[Image.Image, Image.Image, Scene, Scene]:
    """(minus image, plus image, minus scene, plus scene): identical except for `concept`, fully captioned.

    Size, place and hue are drawn from `seed`, the concept's two values at least PAIR_GAP apart in either
    direction; both shapes stay inside the frame, and every pixel outside their bounding boxes is identical.
    """
    if concept not in CONCEPTS:
        raise ValueError(f"concept must be one of {', '.join(CONCEPTS)}, not {concept!r}")
    rng = np.random.default_rng((seed, 7919))
    scene = random_scene(rng, drop_words=False)
    a, b = _pair_values(concept, rng)
    if concept == "size":  # both radii must fit where the shape is
        cx, cy = _place(rng, max(a, b))
        scene = replace(scene, cx=cx, cy=cy)
    elif concept == "position":
        radius = min(scene.radius, SIZE - max(a, b) - MARGIN, min(a, b) - MARGIN, 26.0)
        scene = replace(scene, radius=radius)
    minus, plus = replace(scene, **{FIELD[concept]: a}), replace(scene, **{FIELD[concept]: b})
    return render(minus), render(plus), minus, plus


def _foreground(pixels: np.ndarray) -> np.ndarray:
    """Mask of the shape: pixels far from the background (the median border colour), specks left out.

    A render can scatter small blots around its shape. Counted as the shape, a few dozen of them moved its box
    and centroid enough to read a square as a triangle or a circle (datasets/README.md, "Specks are not the
    shape"); so a patch under SPECK_SHARE of the largest one does not count."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.int16)
    background = np.median(border, axis=0)
    far = np.abs(pixels.astype(np.int16) - background).max(axis=-1) > 60
    if not far.any():
        return far
    labels = components(far)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return far & (counts[labels] >= SPECK_SHARE * counts.max())


def components(mask: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected patches of a 2-D boolean mask: 0 off it, and within a patch the same label,
    the flat index + 1 of its first pixel. Each pixel takes its neighbours' smallest label, then that label's own
    label (pointer jumping), until nothing changes: far fewer rounds than a patch has pixels across."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    none = mask.size + 1
    while True:
        padded = np.pad(np.where(mask, labels, none), 1, constant_values=none)
        smallest = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        step = np.where(mask, smallest, 0)
        step = np.where(mask, step.ravel()[np.maximum(step, 1) - 1].reshape(mask.shape), 0)
        if np.array_equal(step, labels):
            return labels
        labels = step


def _mean_hue(rgb_rows: np.ndarray) -> float:
    """Circular mean hue (degrees) of (n, 3) uint8 colours, weighted by saturation so greys count little."""
    x = rgb_rows.reshape(-1, 3).astype(np.float64) / 255.0
    hi, lo = x.max(axis=1), x.min(axis=1)
    chroma = hi - lo
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = x.T
    h = np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    angles = np.deg2rad(h)
    return float(np.rad2deg(np.arctan2((chroma * np.sin(angles)).sum(), (chroma * np.cos(angles)).sum())) % 360.0)


def measure(image: Image.Image | np.ndarray, concept: str) -> float:
    """size: shape area (px); colour: mean hue (degrees); position: centroid x (px). NaN when no shape."""
    if concept not in CONCEPTS:
        raise ValueError(f"concept must be one of {', '.join(CONCEPTS)}, not {concept!r}")
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    mask = _foreground(pixels)
    if concept == "size":
        return float(mask.sum())
    if mask.sum() < 20:
        return float("nan")
    return float(np.nonzero(mask)[1].mean()) if concept == "position" else _mean_hue(pixels[mask])


def progress(value: float, concept: str, minus: float, plus: float, via: float | None = None) -> float:
    """Where a measured value lies from the pair's minus (0) to its plus (1); hue along the arc through `via`.

    Two arcs join two hues. A slider's sweep passes through its scale-0 render (`via`), so a sweep whose
    scale-0 hue lies off the pair's shorter arc can only reach both ends the long way round: it is read along
    the longer arc. Without `via`, or with it on the shorter arc, the shorter arc. A hue is read as the turn
    from minus that lies within half a circle of the arc's midpoint: on a 147° arc, a hue 54° past plus is
    progress 1.37, not −1.08 (the shorter turn from minus would go the other way)."""
    if concept == "colour":
        arc = hue_difference(minus, plus)
        if via is not None and not 0.0 <= _turn(via, minus, arc) / arc <= 1.0:
            arc -= math.copysign(360.0, arc)
        return _turn(value, minus, arc) / arc
    return (value - minus) / (plus - minus)


def _turn(value: float, minus: float, arc: float) -> float:
    return (value - minus - arc / 2 + 180.0) % 360.0 - 180.0 + arc / 2


@dataclass(frozen=True)
class Description(Worded):
    """What `describe` sees in an image: the shape's mean hue, area (px), centroid, box radius and kind.

    `fill` is the area over the bounding box's: ~1 square, ~0.79 circle, ~0.5 triangle, low for scattered noise.
    The kind is read from where the centroid sits (triangles), then from `fill` or how far the corners reach.
    """

    hue: float | None
    area: int
    cx: float
    cy: float
    radius: float
    shape: str | None
    fill: float = 0.0


def _corners(xs: np.ndarray, ys: np.ndarray) -> float:
    """How far the shape reaches along the diagonals over along the axes: ~1.3 for a square, ~1.0 for a circle.

    A square drawn with its sides pinched in fills its box like a circle, but its corners still reach out
    (99th percentiles, so a stray speck does not count); a rounded one still fills its box."""
    x, y = xs - xs.mean(), ys - ys.mean()
    axis = max(np.percentile(np.abs(x), 99), np.percentile(np.abs(y), 99))
    diagonal = max(np.percentile(np.abs(x + y), 99), np.percentile(np.abs(x - y), 99)) / np.sqrt(2.0)
    return float(diagonal / max(axis, 1e-6))


def describe(image: Image.Image | np.ndarray) -> Description:
    """The shape's hue, area, centroid, radius (half its bounding box) and kind, read back from pixels."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    mask = _foreground(pixels)
    if mask.sum() < 20:
        return Description(None, int(mask.sum()), float("nan"), float("nan"), 0.0, None)
    ys, xs = np.nonzero(mask)
    x0, x1 = np.percentile(xs, (1, 99))
    y0, y1 = np.percentile(ys, (1, 99))
    fill = mask.sum() / max((x1 - x0 + 1) * (y1 - y0 + 1), 1.0)
    # A triangle (apex up) has its centroid a sixth of its height below the box's middle; circles and squares
    # have it in the middle. Unlike `fill`, that survives soft edges: a blurred 10 px triangle fills its box
    # like a circle, and a model render is that soft.
    drop = (ys.mean() - (y0 + y1) / 2) / (y1 - y0 + 1)
    square = fill > 0.9 or _corners(xs, ys) > SQUARE_CORNERS  # full box (a rounded one too), or corners that reach
    shape = "triangle" if drop > TRIANGLE_DROP else "square" if square else "circle"
    radius = float(np.sqrt(mask.sum() / AREA_PER_RADIUS2[shape]))  # from the area: box extremes are thin tips
    return Description(
        _mean_hue(pixels[mask]), int(mask.sum()), float(xs.mean()), float(ys.mean()), float(radius), shape, float(fill)
    )
