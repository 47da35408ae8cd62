"""Pure tensor math for merging LoRAs: exact low-rank merges, concatenation and the dense baseline.

A term is `(weight, up, down, alpha)` and contributes weight · (alpha / rank) · up @ down. Linear factors are
up out×r and down r×in; conv (LoCon) factors are up out×r×1×1 and down r×in×kh×kw, handled by flattening the
kernel into the input axis. Tensors in, tensors out: no files, no key names (merge.py does those).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Term = tuple[float, torch.Tensor, torch.Tensor, float]

# Singular values at or below ZERO_TOL · eps · Σ|wᵢ·sᵢ|·‖upᵢ‖·‖downᵢ‖ are rounding noise: A(+1) + A(−1)
# measured ≤ 3 eps of that bound (sizes up to 300×600, rank 64, float32 and float64); 10× headroom.
ZERO_TOL = 32


@dataclass
class Merged:
    """An exact (or truncated) low-rank factorisation of Σ wᵢ ΔWᵢ, to be used with alpha = rank (scale 1)."""

    up: torch.Tensor  # out×k (or out×k×1×1)
    down: torch.Tensor  # k×in (or k×in×kh×kw)
    singular_values: torch.Tensor  # all of ΔW's non-trivial singular values, descending, float32
    rank: int  # k, the number kept; 0 only when the whole ΔW is zero and truncation was asked for
    retained_energy: float  # Σ_{i<k} S² / Σ S² (1.0 for a zero ΔW)
    rel_error: float  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F, from the singular values (0.0 for a zero ΔW)
    is_zero: bool  # ΔW is rounding noise, e.g. a LoRA merged with itself at +1 and −1


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    """Refuse NaN/inf: one bad factor would silently poison every merged direction through the QR."""
    for t in tensors:
        # One reduction instead of a boolean mask: amax propagates NaN and keeps inf.
        if t.numel() and not math.isfinite(float(t.abs().amax())):
            raise ValueError(f"{name}: contains NaN or inf")


def cast_checked(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast `t` to `dtype`, raising OverflowError if a finite value becomes inf (fp16 tops out at 65504)."""
    out = t.to(dtype)
    if out.dtype == t.dtype or torch.finfo(dtype).max >= torch.finfo(t.dtype).max:
        return out  # no narrower range, nothing can overflow (bf16 has fp32's range)
    if out.is_floating_point() and bool((torch.isinf(out) & torch.isfinite(t)).any()):
        peak = float(t[torch.isfinite(t)].abs().max())
        raise OverflowError(f"casting to {dtype} overflows: max |value| is {peak:.4g}")
    return out


def _validate(terms: Sequence[Term]) -> tuple[int, tuple[int, ...]]:
    """Return (out, down's trailing shape) shared by all terms; errors name the offending shapes."""
    if not terms:
        raise ValueError("no terms to merge")
    _, up0, down0, _ = terms[0]
    for i, (weight, up, down, alpha) in enumerate(terms):
        pair = f"term {i}: up {tuple(up.shape)} / down {tuple(down.shape)}"
        if up.ndim not in (2, 4) or down.ndim != up.ndim or up.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"{pair} is not a LoRA pair (up out×r[×1×1], down r×in[×kh×kw])")
        if up.shape[1] != down.shape[0] or down.shape[0] == 0:
            raise ValueError(f"{pair}: ranks differ or are zero")
        if up.shape[0] != up0.shape[0] or down.shape[1:] != down0.shape[1:]:
            first = f"up {tuple(up0.shape)} / down {tuple(down0.shape)}"
            raise ValueError(f"{pair} does not match term 0's {first}: all terms must share out and in shapes")
        if not (math.isfinite(float(weight)) and math.isfinite(float(alpha))):
            raise ValueError(f"term {i}: weight {weight} or alpha {alpha} is not finite")
        check_finite(f"term {i}", up, down)
    return int(up0.shape[0]), tuple(down0.shape[1:])


def _stack(terms: Sequence[Term], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """U = [w₁s₁up₁ | w₂s₂up₂ | …] (out×R) and D = [down₁; down₂; …] (R×in·kh·kw), so ΔW = U @ D.

    Also returns Σ|wᵢsᵢ|·‖upᵢ‖·‖downᵢ‖, a bound on ‖ΔW‖_F that sets the scale of rounding noise."""
    ups, downs, bound = [], [], 0.0
    for weight, up, down, alpha in terms:
        r = down.shape[0]
        coeff = float(weight) * float(alpha) / r
        u, d = up.reshape(up.shape[0], r).to(dtype), down.reshape(r, -1).to(dtype)
        ups.append(coeff * u)  # the sign lives in U only, so weights may be negative (no sqrt of a weight)
        downs.append(d)
        bound += abs(coeff) * float(torch.linalg.norm(u)) * float(torch.linalg.norm(d))
    return torch.cat(ups, 1), torch.cat(downs, 0), bound


def _shape(up: torch.Tensor, down: torch.Tensor, tail: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat factors back to the input layout: conv gets up out×k×1×1 and down k×in×kh×kw."""
    if len(tail) == 1:
        return up, down
    k = down.shape[0]
    return up.reshape(up.shape[0], k, 1, 1), down.reshape(k, *tail)


def _keep(s: torch.Tensor, tol: float, rank: int | None, sv_fro: float | None, sv_ratio: float | None) -> int:
    """How many singular values a truncating merge keeps (`s` descending)."""
    nonzero = int((s > tol).sum())
    if nonzero == 0:
        return 0  # the whole ΔW is noise: nothing worth writing
    s64 = s.double()
    k = s.numel()
    if sv_fro is not None:
        # sd-scripts resize_lora: searchsorted(cum S² / ΣS², F²) + 1, i.e. the smallest k with
        # sqrt(cum S² / ΣS²) ≥ F. Rounding can leave the last fraction just under 1, hence the min().
        frac = torch.cumsum(s64**2, 0) / (s64**2).sum()
        k = min(int(torch.searchsorted(frac, torch.tensor([sv_fro**2], dtype=frac.dtype))) + 1, k)
    elif sv_ratio is not None:
        k = int((s64 > s64[0] / sv_ratio).sum())  # sd-scripts: keep S > S₀ / ratio
    if rank is not None:
        k = min(k, rank)
    # Directions that are rounding noise carry nothing; drop them but always keep the top one.
    return max(min(k, nonzero), 1)


def _check_options(rank: int | None, sv_fro: float | None, sv_ratio: float | None, dtype: torch.dtype) -> None:
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if sv_fro is not None and sv_ratio is not None:
        raise ValueError("choose one of sv_fro and sv_ratio, not both")
    if sv_fro is not None and not 0 < sv_fro <= 1:
        raise ValueError(f"sv_fro is a fraction of the Frobenius norm in (0, 1], got {sv_fro}")
    if sv_ratio is not None and not sv_ratio >= 1:
        raise ValueError(f"sv_ratio keeps S > S₀/ratio and must be at least 1, got {sv_ratio}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")


@torch.no_grad()
def merge_exact(
    terms: Sequence[Term],
    *,
    rank: int | None = None,
    sv_fro: float | None = None,
    sv_ratio: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Merged:
    """Factor ΔW = Σ wᵢ·(alphaᵢ/rᵢ)·upᵢ@downᵢ exactly without building the dense out×in matrix.

    With U = [wᵢsᵢupᵢ …] and D = [downᵢ; …]: U = Qu·Ru and Dᵀ = Qd·Rd, so ΔW = Qu·(Ru·Rdᵀ)·Qdᵀ with
    orthonormal Qu, Qd; the small core's SVD is therefore ΔW's SVD. By default nothing is dropped (rank
    min(out, in·kh·kw, Σrᵢ), lossless); `rank` keeps the top k, `sv_fro` / `sv_ratio` choose k as sd-scripts'
    resize_lora does, capped by `rank` when both are given. Use the result with alpha = rank (scale 1).
    Computes in float64 when `dtype` is float64, else in float32.
    """
    _check_options(rank, sv_fro, sv_ratio, dtype)
    _, tail = _validate(terms)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u, d, bound = _stack(terms, compute)
    qu, ru = torch.linalg.qr(u)  # out×p, p×R with p = min(out, R)
    qd, rd = torch.linalg.qr(d.T)  # n×q, q×R with q = min(n, R)
    uc, s, vch = torch.linalg.svd(ru @ rd.T, full_matrices=False)  # p×q core: m = min(out, n, R) values
    tol = ZERO_TOL * torch.finfo(compute).eps * bound
    is_zero = not bool(s[0] > tol)
    truncate = rank is not None or sv_fro is not None or sv_ratio is not None
    k = _keep(s, tol, rank, sv_fro, sv_ratio) if truncate else s.numel()

    root = s[:k].sqrt()  # split √S between the factors so neither carries the whole magnitude
    up = (qu @ uc[:, :k]) * root
    down = root[:, None] * (vch[:k] @ qd.T)
    up, down = _shape(up, down, tail)

    s2 = s.double() ** 2
    total, dropped = float(s2.sum()), float(s2[k:].sum())  # the tail summed directly: no 1 − x cancellation
    retained, rel_error = (1.0, 0.0) if is_zero else (1.0 - dropped / total, math.sqrt(dropped / total))
    return Merged(
        up=cast_checked(up, dtype),
        down=cast_checked(down, dtype),
        singular_values=s.float(),
        rank=k,
        retained_energy=retained,
        rel_error=rel_error,
        is_zero=is_zero,
    )


@torch.no_grad()
def concat_exact(
    terms: Sequence[Term], *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Concatenate along the rank axis with each weight·scale folded into `up`; returns (up, down, alpha).

    alpha is the total rank, so scale is 1 and the result reproduces Σ wᵢ ΔWᵢ exactly. (sd-scripts'
    `--concat` keeps the first alpha while the rank grows, so an A(+1)/B(−1) pair loads at half strength.)"""
    _, tail = _validate(terms)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u, d, _ = _stack(terms, compute)
    up, down = _shape(u, d, tail)
    return cast_checked(up, dtype), cast_checked(down, dtype), float(d.shape[0])


@torch.no_grad()
def dense_delta(terms: Sequence[Term], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense reference Σ wᵢ·sᵢ·upᵢ@downᵢ, shaped like the target weight. For tests and the baseline."""
    out, tail = _validate(terms)
    total = torch.zeros(out, math.prod(tail), dtype=dtype, device=terms[0][1].device)
    for weight, up, down, alpha in terms:
        r = down.shape[0]
        total += (float(weight) * float(alpha) / r) * (up.reshape(out, r).to(dtype) @ down.reshape(r, -1).to(dtype))
    return total.reshape(out, *tail)


@torch.no_grad()
def dense_svd_merge(terms: Sequence[Term], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sd-scripts-style baseline: dense ΔW, full SVD, top `rank`, √S split (no clamping). Scale 1.

    Deliberately as costly as svd_merge_lora (full_matrices=True, as its plain torch.linalg.svd call gets),
    since it exists to be benchmarked against."""
    _, tail = _validate(terms)
    delta = dense_delta(terms).flatten(1)
    u, s, vh = torch.linalg.svd(delta)
    k = min(rank, *delta.shape)
    root = s[:k].sqrt()
    return _shape(u[:, :k] * root, root[:, None] * vh[:k], tail)


def factored_rel_error(terms: Sequence[Term], up: torch.Tensor, down: torch.Tensor, scale: float) -> float:
    """‖Σ wᵢsᵢ upᵢ downᵢ − scale·up·down‖_F / ‖Σ wᵢsᵢ upᵢ downᵢ‖_F without the dense matrices.

    With A = [U | −scale·up] and B = [D; down], ‖A B‖² = Σ (AᵀA ∘ BBᵀ): small Gram matrices only, in
    float64 so the subtraction of nearly equal norms still resolves errors down to ~1e-8 relative.
    """
    exact_u, exact_d, _ = _stack(terms, torch.float64)
    a = torch.cat([exact_u, -scale * up.flatten(1).double()], dim=1)
    b = torch.cat([exact_d, down.flatten(1).double()], dim=0)
    diff = float((a.T @ a * (b @ b.T)).sum().clamp_min(0))
    norm = float(((exact_u.T @ exact_u) * (exact_d @ exact_d.T)).sum().clamp_min(0))
    return math.sqrt(diff / norm) if norm > 0 else 0.0
