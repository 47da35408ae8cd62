"""The quality check's measure of what a prompt leaves out: how much of the data's range its seeds leave empty.

`varies` only asks whether two words were seen; the shipped model draws "a square" red on 48 of 48 seeds
(hue 341–17°) and "a square on the left" red or cyan, never yellow or green, which `varies` calls varied.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from loratool.demo import shapes
from loratool.demo.quality import gaps, largest_gap, uniform_gap


def test_the_widest_empty_stretch_wraps_round_the_wheel_and_counts_the_ends_of_a_range():
    assert largest_gap([0, 90, 180, 270], 0, 360, circular=True) == pytest.approx(0.25)
    assert largest_gap([350, 10], 0, 360, circular=True) == pytest.approx(340 / 360)  # not 20°: it wraps
    assert largest_gap([725], 0, 360, circular=True) == 1.0 and largest_gap([], 0, 360, circular=True) == 1.0
    assert largest_gap([30, 40, 50], 20, 60) == pytest.approx(0.25)  # 20→30 and 50→60 are stretches too
    assert largest_gap([0, 100], 20, 60) == 1.0  # both outside the range: it is all empty


@pytest.mark.parametrize("circular", [True, False])
@pytest.mark.parametrize("n", [1, 4, 12])
def test_uniform_draws_leave_on_average_the_gap_uniform_gap_expects(n, circular):
    rng = np.random.default_rng(n)
    drawn = [largest_gap(rng.uniform(10, 70, n), 10, 70, circular) for _ in range(4000)]
    assert np.mean(drawn) == pytest.approx(uniform_gap(n, circular), abs=0.01)


def test_uniform_gap_shrinks_with_more_draws():
    for circular in (True, False):
        values = [uniform_gap(n, circular) for n in (1, 2, 4, 8, 16, 64)]
        assert all(a > b for a, b in zip(values, values[1:], strict=False)) and values[-1] < 0.1


def test_a_left_out_colour_in_one_corner_of_the_wheel_reads_as_a_wide_gap_and_a_spread_one_does_not():
    """Eight seeds of a prompt that names only the shape: drawn at hues 0–35° (as the shipped model draws "a
    square"), then spread round the wheel. The place varies over 40–75 px, the size not at all; neither is
    named."""
    scene = replace(shapes.scene_for(3, 0, drop_words=False), shape="square", named=("shape",))
    corner = [replace(scene, hue=h, cx=40.0 + 5 * i) for i, h in enumerate(range(0, 40, 5))]
    spread = [replace(s, hue=45.0 * i) for i, s in enumerate(corner)]
    for scenes, expected in ((corner, 325 / 360), (spread, 0.125)):
        report = gaps([shapes.describe(shapes.render(s)) for s in scenes], scenes, seeds=len(scenes))
        assert report["colour"]["gap"] == pytest.approx(expected, abs=0.03), report
        assert report["colour"]["if_uniform"] == pytest.approx(uniform_gap(8, circular=True), abs=0.001)
        assert report["size"]["gap"] > 0.5  # one radius: most of 10–34 px is never drawn
        assert report["position"]["gap"] < 0.5  # x 40–75 px of 24–104


def test_an_attribute_the_prompt_names_is_not_counted():
    scenes = [replace(shapes.scene_for(3, 0, drop_words=False), named=shapes.ATTRIBUTES)] * 2
    assert gaps([shapes.describe(shapes.render(s)) for s in scenes], scenes, seeds=2) == {}
