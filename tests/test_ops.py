"""Property and table tests for the pure merge math in loratool.lora.ops (tiny tensors, CPU, seconds)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.lora import ops
from loratool.lora.network import LoraModule
from loratool.lora.ops import (
    cast_checked,
    check_finite,
    concat_exact,
    dense_delta,
    dense_svd_merge,
    merge_exact,
)

FAST = settings(max_examples=40, deadline=None)


@st.composite
def term_sets(draw, conv=None):
    """1–4 random terms sharing out/in: signed weights, differing ranks and alphas, linear or LoCon conv."""
    out, fan_in = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    is_conv = draw(st.booleans()) if conv is None else conv
    ranks = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    terms = []
    for r in ranks:
        sign = draw(st.sampled_from([-1.0, 1.0]))
        weight = sign * draw(st.floats(0.25, 2.0))
        alpha = draw(st.floats(0.5, 16.0))
        up_shape, down_shape = ((out, r, 1, 1), (r, fan_in, 3, 3)) if is_conv else ((out, r), (r, fan_in))
        terms.append((weight, torch.randn(up_shape, generator=g), torch.randn(down_shape, generator=g), alpha))
    return terms


def _product(up, down):
    """up @ down at scale 1, in float64, shaped like the target weight (the merged outputs' contract)."""
    flat = up.double().flatten(1) @ down.double().flatten(1)
    return flat.reshape(up.shape[0], *down.shape[1:])


def _rel(a, b):
    return float(torch.linalg.norm((a - b).flatten()) / torch.linalg.norm(b.flatten()))


def _known_spectrum(s, out=7, fan_in=9, seed=0):
    """A single term whose ΔW has exactly the singular values `s` (orthonormal factors, alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    qa, _ = torch.linalg.qr(torch.randn(out, len(s), generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(fan_in, len(s), generator=g, dtype=torch.float64))
    s = torch.tensor(s, dtype=torch.float64)
    return [(1.0, (qa * s).float(), qb.T.float(), float(len(s)))]


@FAST
@given(term_sets())
def test_dense_delta_matches_lora_module(terms):
    # An oracle independent of ops: the in-memory class's own delta() (float32, hence the tolerance).
    expected = sum(w * LoraModule("unet", "x", down, up, alpha).delta().double() for w, up, down, alpha in terms)
    assert _rel(dense_delta(terms, dtype=torch.float64), expected) < 1e-6


@FAST
@given(term_sets())
def test_merge_exact_is_lossless_at_default_rank(terms):
    merged = merge_exact(terms)
    dense = dense_delta(terms, dtype=torch.float64)
    out, n = dense.shape[0], math.prod(dense.shape[1:])
    total_rank = sum(down.shape[0] for _, _, down, _ in terms)
    assert merged.rank == min(out, n, total_rank) == merged.down.shape[0] == merged.up.shape[1]
    assert merged.up.dtype == merged.down.dtype == torch.float32
    assert merged.up.ndim == merged.down.ndim == terms[0][1].ndim
    assert _rel(_product(merged.up, merged.down), dense) <= 1e-5
    assert merged.rel_error == 0.0 and merged.retained_energy == 1.0


@FAST
@given(term_sets(), st.integers(1, 40))
def test_truncation_error_is_the_singular_value_tail(terms, k):
    merged = merge_exact(terms, rank=k)
    s = merged.singular_values.double()
    assert merged.rank == min(k, len(s))
    predicted = float(torch.linalg.norm(s[merged.rank :]) / torch.linalg.norm(s))
    dense = dense_delta(terms, dtype=torch.float64)
    assert abs(merged.rel_error - predicted) <= 1e-6
    assert abs(_rel(_product(merged.up, merged.down), dense) - predicted) <= 1e-5
    assert abs(merged.retained_energy - (1 - predicted**2)) <= 1e-6


@FAST
@given(term_sets(), st.floats(0.05, 1.0), st.integers(1, 40))
def test_sv_fro_keeps_the_smallest_k_reaching_the_target(terms, target, cap):
    s2 = merge_exact(terms).singular_values.double() ** 2
    frac = torch.cumsum(s2, 0) / s2.sum()
    # sd-scripts resize_lora's index_sv_fro, without its "never keep all" clamp to len(S) − 1
    sd_scripts_k = min(int(torch.searchsorted(frac, target**2)) + 1, len(s2))
    assert merge_exact(terms, sv_fro=target).rank == sd_scripts_k
    assert merge_exact(terms, sv_fro=target, rank=cap).rank == min(sd_scripts_k, cap)


@FAST
@given(term_sets(), st.floats(1.0, 100.0), st.integers(1, 40))
def test_sv_ratio_keeps_values_above_the_largest_over_ratio(terms, ratio, cap):
    s = merge_exact(terms).singular_values.double()
    expected = max(int((s > s[0] / ratio).sum()), 1)
    assert merge_exact(terms, sv_ratio=ratio).rank == expected
    assert merge_exact(terms, sv_ratio=ratio, rank=cap).rank == min(expected, cap)


# S = [4, 3, 2, 1]: cumulative S² fractions 16/30, 25/30, 29/30, 1 (sqrt: 0.730, 0.913, 0.983, 1)
@pytest.mark.parametrize(
    ("options", "k"),
    [
        ({}, 4),
        ({"rank": 2}, 2),
        ({"rank": 9}, 4),
        ({"sv_fro": 0.7}, 1),
        ({"sv_fro": 0.9}, 2),
        ({"sv_fro": 0.92}, 3),
        ({"sv_fro": 1.0}, 4),
        ({"sv_fro": 0.99, "rank": 2}, 2),
        ({"sv_ratio": 1.5}, 2),
        ({"sv_ratio": 2.5}, 3),
        ({"sv_ratio": 10.0}, 4),
        ({"sv_ratio": 10.0, "rank": 3}, 3),
    ],
)
def test_rank_choice_on_a_known_spectrum(options, k):
    merged = merge_exact(_known_spectrum([4.0, 3.0, 2.0, 1.0]), **options)
    assert merged.rank == k
    torch.testing.assert_close(merged.singular_values, torch.tensor([4.0, 3.0, 2.0, 1.0]))
    kept = sum(x * x for x in [4, 3, 2, 1][:k])
    assert merged.retained_energy == pytest.approx(kept / 30, abs=1e-6)
    assert merged.rel_error == pytest.approx(math.sqrt(1 - kept / 30), abs=1e-6)


def test_numerically_zero_directions_are_dropped_only_when_truncating():
    terms = _known_spectrum([3.0, 1.0, 0.0, 0.0])
    assert merge_exact(terms).rank == 4  # lossless default keeps every column
    assert merge_exact(terms, rank=4).rank == 2
    assert merge_exact(terms, sv_fro=1.0).rank == 2


@FAST
@given(term_sets(), st.sampled_from([None, 3]))
def test_a_lora_minus_itself_is_zero(terms, rank):
    weight, up, down, alpha = terms[0]
    merged = merge_exact([(weight, up, down, alpha), (-weight, up, down, alpha)], rank=rank)
    assert merged.is_zero
    assert merged.rel_error == 0.0 and merged.retained_energy == 1.0
    for t in (merged.up, merged.down, merged.singular_values):
        assert bool(torch.isfinite(t).all())
    if rank is None:
        assert merged.rank == min(up.shape[0], math.prod(down.shape[1:]), 2 * down.shape[0])
    else:
        assert merged.rank == 0 and merged.up.shape[1] == 0 and merged.down.shape[0] == 0


def test_all_zero_factors_are_zero_without_nan():
    merged = merge_exact([(1.0, torch.zeros(5, 2), torch.zeros(2, 6), 2.0)])
    assert merged.is_zero and merged.rank == 2
    assert not merged.up.any() and not merged.down.any()


def test_float64_output_is_exact_to_double_precision():
    g = torch.Generator().manual_seed(1)
    terms = [(0.8, torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g), 3.0)]
    terms.append((-1.3, torch.randn(40, 5, generator=g), torch.randn(5, 30, generator=g), 5.0))
    merged = merge_exact(terms, dtype=torch.float64)
    assert merged.up.dtype == torch.float64
    assert _rel(_product(merged.up, merged.down), dense_delta(terms, dtype=torch.float64)) < 1e-12


@FAST
@given(term_sets())
def test_concat_exact_reproduces_the_sum_at_full_strength(terms):
    up, down, alpha = concat_exact(terms)
    assert alpha == sum(d.shape[0] for _, _, d, _ in terms) == down.shape[0]
    assert up.ndim == down.ndim == terms[0][1].ndim
    scale = alpha / down.shape[0]
    assert _rel(scale * _product(up, down), dense_delta(terms, dtype=torch.float64)) <= 1e-6


@FAST
@given(term_sets())
def test_dense_svd_baseline_at_full_rank_matches_the_dense_delta(terms):
    dense = dense_delta(terms, dtype=torch.float64)
    up, down = dense_svd_merge(terms, rank=sum(d.shape[0] for _, _, d, _ in terms))
    assert up.shape[2:] == terms[0][1].shape[2:] and down.shape[1:] == terms[0][2].shape[1:]
    assert _rel(_product(up, down), dense) <= 1e-5


@pytest.mark.parametrize(
    ("second_up", "second_down"),
    [((9, 2), (2, 6)), ((8, 2), (2, 7)), ((8, 2, 1, 1), (2, 6, 3, 3))],
)
def test_mismatched_shapes_name_both(second_up, second_down):
    terms = [(1.0, torch.ones(8, 4), torch.ones(4, 6), 4.0), (1.0, torch.ones(second_up), torch.ones(second_down), 2.0)]
    for fn in (merge_exact, concat_exact, dense_delta):
        with pytest.raises(ValueError, match=r"\(8, 4\).*\(4, 6\)") as err:
            fn(terms)
        assert str(tuple(second_up)) in str(err.value) and str(tuple(second_down)) in str(err.value)


@pytest.mark.parametrize(
    ("up", "down"),
    [((8, 3), (4, 6)), ((8, 0), (0, 6)), ((8, 4, 3, 3), (4, 6, 3, 3))],
)
def test_malformed_pairs_are_refused(up, down):
    with pytest.raises(ValueError, match="term 0"):
        merge_exact([(1.0, torch.ones(up), torch.ones(down), 1.0)])


@pytest.mark.parametrize(
    "options",
    [{"rank": 0}, {"sv_fro": 0.0}, {"sv_fro": 1.5}, {"sv_ratio": 0.5}, {"sv_fro": 0.9, "sv_ratio": 2.0}],
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        merge_exact(_known_spectrum([1.0]), **options)


def test_non_finite_inputs_are_refused():
    with pytest.raises(ValueError, match="a: contains NaN or inf"):
        check_finite("a", torch.ones(2), torch.tensor([1.0, float("nan")]))
    check_finite("fine", torch.ones(3))
    bad = [(1.0, torch.tensor([[float("inf")]]), torch.ones(1, 1), 1.0)]
    with pytest.raises(ValueError, match="term 0: contains NaN or inf"):
        merge_exact(bad)
    with pytest.raises(ValueError, match="not finite"):
        merge_exact([(float("nan"), torch.ones(1, 1), torch.ones(1, 1), 1.0)])


def test_cast_checked_catches_fp16_overflow():
    assert cast_checked(torch.tensor([1.0, 65000.0]), torch.float16).dtype == torch.float16
    with pytest.raises(OverflowError):
        cast_checked(torch.tensor([1.0, 70000.0]), torch.float16)
    # inf that was already inf is not an overflow
    assert torch.isinf(cast_checked(torch.tensor([float("inf")]), torch.float16)).all()
    with pytest.raises(OverflowError):
        merge_exact([(1.0, torch.full((2, 1), 1e3), torch.full((1, 2), 1e3), 1e5)], dtype=torch.float16)


@given(st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_factored_rel_error_matches_dense(seed):
    g = torch.Generator().manual_seed(seed)
    terms = [
        (1.0, torch.randn(12, 3, generator=g), torch.randn(3, 9, generator=g), 2.0),
        (-0.5, torch.randn(12, 2, generator=g), torch.randn(2, 9, generator=g), 2.0),
    ]
    up, down = torch.randn(12, 2, generator=g), torch.randn(2, 9, generator=g)
    exact = ops.dense_delta(terms, dtype=torch.float64)
    want = float((exact - 0.7 * up.double() @ down.double()).norm() / exact.norm())
    assert abs(ops.factored_rel_error(terms, up, down, 0.7) - want) <= 1e-9
    merged = ops.merge_exact(terms)
    assert ops.factored_rel_error(terms, merged.up, merged.down, 1.0) <= 1e-5
