"""The sweep statistics in loratool.metrics: Spearman, monotone growth and the largest jump's share (glide)."""

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from loratool.metrics import grows, largest_jump_share, largest_share, spearman

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
series = st.lists(finite, min_size=2, max_size=12)


def _moves(values) -> bool:
    """Jumps large enough that their sum is not lost to rounding."""
    return sum(abs(b - a) for a, b in zip(values, values[1:], strict=False)) > 1e-6 * max(1.0, *map(abs, values))


@given(series, st.floats(min_value=1e-3, max_value=1e3), finite)
def test_largest_jump_share_ignores_units_offset_and_direction(values, factor, offset):
    assume(_moves(values))
    share = largest_jump_share(values)
    for other in ([v * factor for v in values], [v + offset for v in values], [-v for v in values]):
        assume(_moves(other))
        assert largest_jump_share(other) == pytest.approx(share, rel=1e-6)


@given(series)
def test_largest_jump_share_lies_between_an_even_glide_and_a_switch(values):
    assume(_moves(values))
    share = largest_jump_share(values)
    assert 1 / (len(values) - 1) - 1e-9 <= share <= 1 + 1e-9


@given(st.integers(min_value=2, max_value=30), finite, st.floats(min_value=1e-3, max_value=1e3))
def test_a_linear_ramp_glides_evenly(n, start, step):
    ramp = [start + step * k for k in range(n)]
    assert largest_jump_share(ramp) == pytest.approx(1 / (n - 1), rel=1e-6)


@given(st.integers(min_value=1, max_value=10), st.integers(min_value=1, max_value=10), finite, finite)
def test_a_step_is_a_switch(before, after, low, high):
    assume(low != high)
    assert largest_jump_share([low] * before + [high] * after) == 1.0


def test_even_glide_over_five_points_and_the_cases_with_nothing_to_share():
    assert largest_jump_share([-1, -0.5, 0, 0.5, 1]) == 0.25
    assert largest_jump_share([0, 0, 0, 0, 0]) is None  # nothing moved: no share, not NaN
    assert largest_jump_share([3.0]) is None and largest_jump_share([]) is None
    assert largest_share([0.1, 0.1, 0.2]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        largest_share([0.1, -0.1])
    with pytest.raises(ValueError):
        largest_jump_share([0.0, math.inf])


@pytest.mark.parametrize(
    "values,expected",
    [
        ([0, 0.1, 0.2], True),
        ([0, 0.1, 0.1, 0.3], True),  # a tie on the way still grows
        ([0, 0.2, 0.1], False),
        ([0, 0, 0], False),  # flat: nothing grows
        ([0], None),
    ],
)
def test_grows(values, expected):
    assert grows(values) is expected


@pytest.mark.parametrize(
    "x,y,rho",
    [
        ([1, 2, 3, 4, 5], [5, 6, 7, 8, 7], 0.8207826816681233),  # scipy.stats.spearmanr, with a tie
        ([1, 2, 3], [3, 2, 1], -1.0),
        ([1, 0, 0, 0, 1], [0.5, 0.1, 0.0, 0.2, 0.6], 0.8660254037844387),  # |scale| of -1..1, ties
        ([1, 1, 1], [1, 2, 3], None),
    ],
)
def test_spearman(x, y, rho):
    got = spearman(x, y)
    assert got == (None if rho is None else pytest.approx(rho))
