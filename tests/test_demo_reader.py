"""`shapes.describe`, the reader every demo figure rests on: what it reads off drawn, blurred, pinched and
specked shapes, and the patch labelling that leaves specks out."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter

from loratool.demo import shapes


def test_describe_recovers_what_was_drawn():
    images, scenes = shapes.render_many(300, seed=11, backgrounds=tuple(shapes.BACKGROUNDS))
    seen = [shapes.describe(img) for img in images]
    pairs = list(zip(seen, scenes, strict=True))
    assert np.mean([d.shape == s.shape for d, s in pairs]) >= 0.95
    assert max(abs(shapes.hue_difference(d.hue, s.hue)) for d, s in pairs) < 6
    assert max(abs(d.cx - s.cx) for d, s in pairs) < 1.5
    assert max(abs(d.radius - s.radius) for d, s in pairs) < 1.5


@pytest.mark.parametrize("blur", [1.2, 1.6])
def test_describe_reads_the_kind_of_soft_edged_and_small_shapes(blur):
    """Model renders have soft edges; read by how full its box is, a blurred small triangle passed for a circle
    (0.87 and 0.76 of these read right, under two thirds of the small ones) and shape agreement looked worse
    than the renders were."""
    scenes = [shapes.scene_for(77, i) for i in range(300)]
    seen = [shapes.describe(shapes.render(s).filter(ImageFilter.GaussianBlur(blur))).shape for s in scenes]
    right = np.array([a == s.shape for a, s in zip(seen, scenes, strict=True)])
    small = np.array([s.radius < 14 for s in scenes])
    assert small.sum() >= 30 and right[small].mean() >= 0.97 and right.mean() >= 0.98


def test_describe_reads_a_square_with_pinched_sides_as_a_square():
    """The model sometimes draws a square whose sides bow inward; by box fill it passed for a circle."""
    rng = np.random.default_rng(3)
    for _ in range(12):
        r, cx, cy, pinch = rng.uniform(12, 30), rng.uniform(40, 88), rng.uniform(45, 83), rng.uniform(0.25, 0.4)
        img = Image.new("RGB", (512, 512), "white")
        outline = []
        for (ax, ay), (bx, by) in [((-1, -1), (1, -1)), ((1, -1), (1, 1)), ((1, 1), (-1, 1)), ((-1, 1), (-1, -1))]:
            mx, my = (ax + bx) / 2 * (1 - pinch), (ay + by) / 2 * (1 - pinch)  # side midpoint, pushed in
            outline += [(ax, ay), (mx, my)]
        ImageDraw.Draw(img).polygon([(4 * (cx + r * u), 4 * (cy + r * v)) for u, v in outline], fill=(40, 90, 220))
        seen = shapes.describe(img.reduce(4).filter(ImageFilter.GaussianBlur(0.8)))
        assert seen.shape == "square", (r, pinch, seen)
        assert seen.fill < 0.9  # what the old reader went by


def test_describe_reads_a_shape_the_same_with_specks_around_it():
    """Renders scatter small blots around the shape; counted as the shape, they turned squares into triangles and
    circles on the size sheets (datasets/README.md, "Specks are not the shape")."""
    rng = np.random.default_rng(21)
    scenes = [shapes.scene_for(91, i) for i in range(40)]
    for scene in scenes:
        image = shapes.render(scene).filter(ImageFilter.GaussianBlur(1.2))
        clean = shapes.describe(image)
        draw = ImageDraw.Draw(image)
        for _ in range(6):  # blots of the shape's colour, clear of it, 2-4 px across
            x, y = rng.uniform(3, shapes.SIZE - 7, size=2)
            while np.hypot(x - scene.cx, y - scene.cy) < scene.radius * 1.6 + 6:
                x, y = rng.uniform(3, shapes.SIZE - 7, size=2)
            side = rng.uniform(2, 4)
            draw.ellipse((x, y, x + side, y + side), fill=shapes.render(scene).getpixel((int(scene.cx), int(scene.cy))))
        specked = shapes.describe(image)
        assert (specked.shape, specked.area) == (clean.shape, clean.area), scene
        assert (specked.cx, specked.radius) == (clean.cx, clean.radius)


@given(st.lists(st.lists(st.booleans(), min_size=9, max_size=9), min_size=1, max_size=9))
def test_components_label_each_4_connected_patch_once(rows):
    mask = np.array(rows)
    labels = shapes.components(mask)
    assert ((labels > 0) == mask).all()
    seen = np.zeros_like(mask)  # a flood fill from each unvisited pixel must cover exactly one label
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        patch, stack = set(), [(y, x)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and (a, b) not in patch:
                patch.add((a, b))
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
        for a, b in patch:
            seen[a, b] = True
        assert {labels[a, b] for a, b in patch} == {labels[y, x]}
        assert (labels == labels[y, x]).sum() == len(patch)
