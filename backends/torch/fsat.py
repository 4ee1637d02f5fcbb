"""FSAT on PyTorch tensors: the ``fsat`` namespace of spec/interface.md, with autograd.

Every function mirrors the NumPy reference :mod:`refattn.fsat` (same names, keywords, defaults,
shapes and tie-breaks) on tensors of one device (CPU or CUDA). float64 and float32 inputs are
computed in their own dtype; float16 and bfloat16 inputs are computed in float32 (FFT, softmax,
reductions) and the results cast back to the input dtype. Offsets are int64.

Differentiable (``torch.autograd``): ``cross`` (a, b), ``estimate`` (c, w), ``sparse_attention``
(q, k, v, bias) and ``attention`` (q, k, v, w, cross_q, cross_k). ``cross`` and
``sparse_attention`` are ``torch.autograd.Function``s whose backward is the explicit VJP below, and
``attention`` composes them with the gradient truncation of spec/fsat.md step 4: the cross module
sees *detached* q and k, so q and k get gradient only through the sparse attention, w through the
bias s[offsets], given cross inputs through the estimator path, and the offsets none. Without
cross inputs ``attention`` never forms c: the scores are one inverse FFT of the w-weighted
spectrum per (batch, head) (the inverse transform is linear), instead of Dc inverse transforms.

Memory: the sparse attention loops over the K selected offsets; each step pairs every row i with
row i + tau of k (or v), by contiguous slices per (batch, head) on a CPU and by a row gather on a
GPU, so no (B, H, L, K, D) tensor is ever built. Forward saves (q, k, v, offsets, out, lse) and the
(B, H, L, K) probabilities, O(B H L (K + D)); backward needs no recomputation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from refattn.checks import flag
from refattn.fsat import FSATGrads
from refattn.fsat.cross import next_fast_len

from . import _checks as chk

__all__ = [
    "pair_counts",
    "cross",
    "cross_vjp",
    "estimate",
    "estimate_vjp",
    "select",
    "candidate_order",
    "sparse_attention",
    "sparse_attention_vjp",
    "attention",
    "attention_vjp",
    "attention_with_offsets",
    "FSATGrads",
]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# step 1: the cross
# --------------------------------------------------------------------------------------------


def _fft_length(length: int) -> int:
    """N >= 2L - 1, a fast real-FFT size: no wrap-around reaches the entries the convolutions keep."""
    return next_fast_len(2 * length - 1)


def _counts(length: int, unpadded: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """n_tau as a float64 (B or 1, 2L - 1) tensor; exact integers (FFT in float64, rounded)."""
    if unpadded is None:
        tau = torch.arange(-(length - 1), length, device=device, dtype=torch.float64)
        return (length - tau.abs())[None, :]
    valid = unpadded.to(torch.float64)
    n = _fft_length(length)
    spectrum = torch.fft.rfft(valid.flip(-1), n=n, dim=-1) * torch.fft.rfft(valid, n=n, dim=-1)
    return torch.fft.irfft(spectrum, n=n, dim=-1)[:, : 2 * length - 1].round()


def _inverse_counts(length: int, unpadded: torch.Tensor | None, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """1 / n_tau as a (B or 1, 1, 2L - 1, 1) tensor of ``dtype``, 0 where n_tau = 0."""
    counts = _counts(length, unpadded, device)
    inverse = torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), torch.zeros_like(counts))
    return inverse.to(dtype)[:, None, :, None]


def _has_pairs(length: int, unpadded: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """(B, 1, 2L - 1) bool "n_tau > 0", or None without padding (every offset has a pair)."""
    if unpadded is None:
        return None
    return (_counts(length, unpadded, device) > 0)[:, None, :]


def _spectrum(a: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """P = rfft(reverse(a)) * rfft(b) over the sequence, zero-padded to N = next_fast_len(2L - 1):
    (B, H, Dc, N // 2 + 1) complex. irfft(P)[..., :2L - 1] is the cross numerator, free of wrap-around.
    The sequence axis is moved last first, so that each transform reads contiguous memory."""
    n = _fft_length(length)
    a_rows = a.flip(2).transpose(2, 3).contiguous()
    b_rows = b.transpose(2, 3).contiguous()
    spectrum = torch.fft.rfft(a_rows, n=n, dim=-1)
    return spectrum.mul_(torch.fft.rfft(b_rows, n=n, dim=-1))  # in place: one spectrum fewer at the peak


def _zero_padded(x: torch.Tensor, unpadded: torch.Tensor | None) -> torch.Tensor:
    if unpadded is None:
        return x
    return torch.where(unpadded[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _unpadded(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else ~mask


def _cross_core(a: torch.Tensor, b: torch.Tensor, unpadded: torch.Tensor | None) -> torch.Tensor:
    """c for compute-dtype a, b: (B, H, 2L - 1, Dc)."""
    length = a.shape[2]
    spectrum = _spectrum(_zero_padded(a, unpadded), _zero_padded(b, unpadded), length)
    numerator = torch.fft.irfft(spectrum, n=_fft_length(length), dim=-1)[..., : 2 * length - 1].transpose(2, 3)
    return numerator * _inverse_counts(length, unpadded, a.device, a.dtype)


def _cross_vjp_core(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                    unpadded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) for compute-dtype tensors.

    With g = dc / n: da = (b conv reverse(g))[L-1 : 2L-1], db = (a conv g)[L-1 : 2L-1]; a circular
    convolution of length N >= 2L - 1 leaves those L entries free of wrap-around.
    """
    length = a.shape[2]
    a = _zero_padded(a, unpadded)
    b = _zero_padded(b, unpadded)
    g = dc * _inverse_counts(length, unpadded, a.device, a.dtype)
    n = _fft_length(length)
    da = torch.fft.irfft(torch.fft.rfft(b, n=n, dim=2) * torch.fft.rfft(g.flip(2), n=n, dim=2), n=n, dim=2)
    db = torch.fft.irfft(torch.fft.rfft(a, n=n, dim=2) * torch.fft.rfft(g, n=n, dim=2), n=n, dim=2)
    da = _zero_padded(da[:, :, length - 1 : 2 * length - 1], unpadded)
    db = _zero_padded(db[:, :, length - 1 : 2 * length - 1], unpadded)
    return da, db


class _Cross(torch.autograd.Function):
    """c = cross(a, b) with the explicit VJP as backward (saves a and b only)."""

    @staticmethod
    def forward(ctx, a, b, unpadded):  # type: ignore[override]
        ctx.save_for_backward(a, b, unpadded)
        ctx.has_mask = unpadded is not None
        return _cross_core(a, b, unpadded)

    @staticmethod
    def backward(ctx, dc):  # type: ignore[override]
        a, b, unpadded = ctx.saved_tensors
        da, db = _cross_vjp_core(a, b, dc, unpadded if ctx.has_mask else None)
        return da, db, None


def _check_cross_inputs(a: Any, b: Any,
                        key_padding_mask: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    chk.same_device(a=a, b=b, key_padding_mask=key_padding_mask)
    a = chk.sequence(a, "a", "(B, H, L, Dc)")
    b = chk.sequence(b, "b", "(B, H, L, Dc)", tuple(a.shape[:3]), feature=a.shape[3])
    chk.same_dtype(a=a, b=b)
    mask = chk.padding_mask(key_padding_mask, a.shape[0], a.shape[2])
    return a, b, mask


def pair_counts(length: int, key_padding_mask: Any = None) -> torch.Tensor:
    """Number of valid pairs n_tau on every diagonal tau = j - i, index t holding tau = t - (L - 1).

    Without a mask: (1, 2L - 1) int64 on the CPU, n_tau = L - |tau|. With a bool (B, L) mask
    (True = padding): (B, 2L - 1) int64 on the mask's device, the autocorrelation of the validity
    indicator (float64 FFT, rounded: exact).
    """
    length = chk.integer_in_range(length, "length", low=1)
    if key_padding_mask is None:
        return _counts(length, None, torch.device("cpu")).long()
    mask = chk.padding_mask(key_padding_mask, None, length)
    return _counts(length, ~mask, mask.device).long()


def cross(a: Any, b: Any, *, key_padding_mask: Any = None) -> torch.Tensor:
    """Hidden-state cross c[b, h, t] = (1 / n_tau) sum_{valid i} a[b, h, i] * b[b, h, i + tau].

    a, b: (B, H, L, Dc) tensors of one dtype; returns (B, H, 2L - 1, Dc) of that dtype,
    differentiable in a and b. Offsets with n_tau = 0 hold 0. FFT of length next_fast_len(2L - 1).
    """
    a, b, mask = _check_cross_inputs(a, b, key_padding_mask)
    cd = chk.compute_dtype(a.dtype)
    c = _Cross.apply(a.to(cd), b.to(cd), _unpadded(mask))
    return c.to(a.dtype)


def cross_vjp(a: Any, b: Any, dc: Any, *, key_padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`cross`: (da, db), each (B, H, L, Dc); padded rows 0."""
    chk.same_device(a=a, b=b, dc=dc, key_padding_mask=key_padding_mask)
    a, b, mask = _check_cross_inputs(a, b, key_padding_mask)
    batch, heads, length, features = a.shape
    dc = chk.sequence(dc, "dc", "(B, H, 2L - 1, Dc)", (batch, heads, 2 * length - 1), feature=features)
    cd = chk.compute_dtype(a.dtype)
    with torch.no_grad():
        da, db = _cross_vjp_core(a.to(cd), b.to(cd), dc.to(cd), _unpadded(mask))
    return da.to(a.dtype), db.to(a.dtype)


# --------------------------------------------------------------------------------------------
# step 2: estimate and select
# --------------------------------------------------------------------------------------------


def _check_estimate_inputs(c: Any, w: Any,
                           key_padding_mask: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    chk.same_device(c=c, w=w, key_padding_mask=key_padding_mask)
    c = chk.sequence(c, "c", "(B, H, 2L - 1, Dc)")
    batch, heads, count, features = c.shape
    length = chk.length_from_offsets(count, "c")
    w = chk.float_tensor(w, "w", rank=2, axes="(H, Dc)")
    chk.expect_shape(w, "w", (heads, features), "(H, Dc)")
    mask = chk.padding_mask(key_padding_mask, batch, length)
    return c, w, mask, length


def _scores(dots: torch.Tensor, features: int, has_pairs: torch.Tensor | None) -> torch.Tensor:
    """s = <w, c_tau> / sqrt(Dc) from the dot products (B, H, 2L - 1); -inf where n_tau = 0."""
    scores = dots * (1.0 / math.sqrt(features))
    if has_pairs is None:
        return scores
    return torch.where(has_pairs, scores, torch.full((), _NEG_INF, dtype=scores.dtype, device=scores.device))


def _estimate_core(c: torch.Tensor, w: torch.Tensor, has_pairs: torch.Tensor | None) -> torch.Tensor:
    return _scores(torch.einsum("bhtd,hd->bht", c, w), c.shape[3], has_pairs)


def _scores_from_spectrum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
                          unpadded: torch.Tensor | None) -> torch.Tensor:
    """s = estimate(cross(a, b), w) without forming c: by linearity of the inverse FFT,
    sum_d w_d irfft(P_d) = irfft(sum_d w_d P_d), one inverse transform per (b, h) instead of Dc.

    a, b are taken as constants (step 4 cuts the estimator path from q and k); s is differentiable
    in w, and autograd keeps the (B, H, Dc, N // 2 + 1) spectrum, the size of c, for dw.
    """
    length, features = a.shape[2], a.shape[3]
    with torch.no_grad():
        spectrum = _spectrum(_zero_padded(a, unpadded), _zero_padded(b, unpadded), length)
    mixed = torch.matmul(w.to(spectrum.dtype)[:, None, :], spectrum)[:, :, 0]  # (B, H, N // 2 + 1)
    numerator = torch.fft.irfft(mixed, n=_fft_length(length), dim=-1)[..., : 2 * length - 1]
    inverse = _inverse_counts(length, unpadded, a.device, a.dtype)[..., 0]  # (B or 1, 1, 2L - 1)
    return _scores(numerator * inverse, features, _has_pairs(length, unpadded, a.device))


def estimate(c: Any, w: Any, *, key_padding_mask: Any = None) -> torch.Tensor:
    """Scores s[b, h, t] = <w[h], c[b, h, t]> / sqrt(Dc), -inf where n_tau = 0.

    c: (B, H, 2L - 1, Dc); w: (H, Dc) (cast to c's compute dtype). Returns (B, H, 2L - 1) of c's
    dtype, differentiable in c and w.
    """
    c, w, mask, length = _check_estimate_inputs(c, w, key_padding_mask)
    cd = chk.compute_dtype(c.dtype)
    s = _estimate_core(c.to(cd), w.to(cd), _has_pairs(length, _unpadded(mask), c.device))
    return s.to(c.dtype)


def estimate_vjp(c: Any, w: Any, ds: Any, *, key_padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`estimate`: (dc (B, H, 2L - 1, Dc), dw (H, Dc)).

    ``ds`` at offsets with n_tau = 0 is ignored.
    """
    chk.same_device(c=c, w=w, ds=ds, key_padding_mask=key_padding_mask)
    c, w, mask, length = _check_estimate_inputs(c, w, key_padding_mask)
    ds = chk.float_tensor(ds, "ds", rank=3, axes="(B, H, 2L - 1)")
    chk.expect_shape(ds, "ds", tuple(c.shape[:3]), "(B, H, 2L - 1)")
    cd = chk.compute_dtype(c.dtype)
    with torch.no_grad():
        cc, wc, dsc = c.to(cd), w.to(cd), ds.to(cd)
        has_pairs = _has_pairs(length, _unpadded(mask), c.device)
        if has_pairs is not None:
            dsc = torch.where(has_pairs, dsc, torch.zeros((), dtype=cd, device=dsc.device))
        dsc = dsc * (1.0 / math.sqrt(c.shape[3]))
        dc = dsc[..., None] * wc[None, :, None, :]
        dw = torch.einsum("bht,bhtd->hd", dsc, cc)
    return dc.to(c.dtype), dw.to(w.dtype)


def candidate_order(length: int, *, causal: bool = False, device: Any = None) -> torch.Tensor:
    """Candidate offsets in tie-break priority: -1, 1, -2, 2, ... (causal: -1, -2, ...), int64."""
    magnitude = torch.arange(1, length, dtype=torch.int64, device=device)
    if causal:
        return -magnitude
    return torch.stack([-magnitude, magnitude], dim=1).reshape(-1)


def _select_core(s: torch.Tensor, top_k: int, causal: bool) -> torch.Tensor:
    """Offsets (B, H, K_eff) int64 ascending from (noisy) scores s (B, H, 2L - 1)."""
    length = (s.shape[2] + 1) // 2
    candidates = candidate_order(length, causal=causal, device=s.device)
    k_eff = min(top_k, candidates.numel() + 1)
    zero = torch.zeros(s.shape[:2] + (1,), dtype=torch.int64, device=s.device)
    if k_eff == 1:
        return zero
    scores = s.index_select(2, candidates + (length - 1))
    # Stable descending sort: equal scores keep the tie-break priority order of `candidates`;
    # -inf sorts last and keeps that order too.
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :, : k_eff - 1]
    chosen = candidates[best]
    return torch.sort(torch.cat([zero, chosen], dim=-1), dim=-1).values


def select(s: Any, top_k: int, *, causal: bool = False, noise: Any = None) -> torch.Tensor:
    """tau = 0 and the K - 1 candidates with the largest s_tau + g_tau; (B, H, K_eff) int64 ascending.

    Candidates: tau != 0 (causal: tau < 0). Ties: smaller |tau|, then the negative offset.
    K_eff = min(K, 2L - 1), causal min(K, L). ``noise`` (B, H, 2L - 1) is added for the choice only.
    """
    chk.same_device(s=s, noise=noise)
    s = chk.score_tensor(s, "s", rank=3, axes="(B, H, 2L - 1)")
    chk.length_from_offsets(s.shape[2], "s")
    top_k = chk.integer_in_range(top_k, "top_k", low=1)
    cd = chk.compute_dtype(s.dtype)
    s = s.detach().to(cd)
    if noise is not None:
        noise = chk.float_tensor(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        chk.expect_shape(noise, "noise", tuple(s.shape), "(B, H, 2L - 1)")
        s = s + noise.detach().to(cd)
    return _select_core(s, top_k, flag(causal, "causal"))


# --------------------------------------------------------------------------------------------
# step 3: the sparse attention
# --------------------------------------------------------------------------------------------


class _SlicedShift:
    """The three shifted-row primitives of one offset tau[b, h] by contiguous slices (CPU).

    For a pair (i, j = i + tau) inside [0, L): ``dot`` d[b, h, i] = <x[b, h, i], y[b, h, j]>;
    ``add_shifted`` t[b, h, i] += w[b, h, i] * y[b, h, j]; ``add_to_partner`` t[b, h, j] +=
    w[b, h, i] * x[b, h, i]. Rows without a partner take nothing (d = 0). One slice operation per
    (b, h): on a CPU a row gather or index_add_ over (B*H*L, F) costs 10-20x more than these.
    """

    def __init__(self, tau: torch.Tensor, length: int):
        self.spans = [[(max(0, -t), min(length, length - t), t) for t in row] for row in tau.tolist()]

    def _pairs(self):
        for b, row in enumerate(self.spans):
            for h, (first, end, t) in enumerate(row):
                if first < end:
                    yield b, h, slice(first, end), slice(first + t, end + t)

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.zeros(x.shape[:3], dtype=x.dtype, device=x.device)
        for b, h, i, j in self._pairs():
            d[b, h, i] = torch.linalg.vecdot(x[b, h, i], y[b, h, j])
        return d

    def add_shifted(self, target: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
        for b, h, i, j in self._pairs():
            target[b, h, i].addcmul_(weight[b, h, i, None], y[b, h, j])

    def add_to_partner(self, target: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> None:
        for b, h, i, j in self._pairs():
            target[b, h, j].addcmul_(weight[b, h, i, None], x[b, h, i])


class _GatheredShift:
    """:class:`_SlicedShift`'s primitives by one row gather / index_add_ over (B*H*L, F) (GPUs).

    Rows without a partner are clamped to the sequence ends; their weights are 0 wherever these
    primitives are used (invalid pairs have probability and gradient exactly 0), and ``dot``
    zeroes them, so the clamping adds exact zeros.
    """

    def __init__(self, tau: torch.Tensor, length: int):
        batch, heads = tau.shape
        positions = torch.arange(length, device=tau.device)
        partner = positions + tau[:, :, None]  # (B, H, L)
        self.inside = (partner >= 0) & (partner < length)
        base = (torch.arange(batch * heads, device=tau.device) * length).view(batch, heads, 1)
        self.rows = (base + partner.clamp(0, length - 1)).reshape(-1)

    def _gather(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1, y.shape[3]).index_select(0, self.rows).view(*y.shape[:3], y.shape[3])

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.linalg.vecdot(x, self._gather(y))
        return torch.where(self.inside, d, torch.zeros((), dtype=d.dtype, device=d.device))

    def add_shifted(self, target: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
        target.addcmul_(weight[..., None], self._gather(y))

    def add_to_partner(self, target: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> None:
        flat = target.view(-1, target.shape[3])
        flat.index_add_(0, self.rows, (weight[..., None] * x).reshape(-1, x.shape[3]))


SHIFT_KINDS = {"sliced": _SlicedShift, "gathered": _GatheredShift}
_forced_shift_kind: str | None = None


@contextlib.contextmanager
def forced_shifts(kind: str) -> Iterator[None]:
    """Inside the block, pair rows by ``kind`` ("sliced" or "gathered") shifts on every device.

    The conformance suite checks both paths this way (the backend's ``strategies``); outside, the
    choice is by device. A process-wide setting: backward passes run inside the block follow it too.
    """
    global _forced_shift_kind
    if kind not in SHIFT_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(SHIFT_KINDS)}, got {kind!r}")
    previous, _forced_shift_kind = _forced_shift_kind, kind
    try:
        yield
    finally:
        _forced_shift_kind = previous


def _shifts(offsets: torch.Tensor, length: int) -> list[_SlicedShift | _GatheredShift]:
    """One shift per selected offset m: sliced on a CPU and gathered elsewhere, unless forced."""
    kind = _forced_shift_kind or ("sliced" if offsets.device.type == "cpu" else "gathered")
    return [SHIFT_KINDS[kind](offsets[:, :, m], length) for m in range(offsets.shape[2])]


def _valid(offsets: torch.Tensor, length: int, causal: bool, unpadded: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, K) bool: the pair (i, i + tau_m) is inside [0, L), causal-allowed and unpadded."""
    positions = torch.arange(length, device=offsets.device)
    partner = positions[:, None] + offsets[:, :, None, :]  # (B, H, L, K)
    valid = (partner >= 0) & (partner < length)
    if causal:
        valid &= (offsets <= 0)[:, :, None, :]
    if unpadded is not None:
        heads = offsets.shape[1]
        unpadded_bh = unpadded[:, None, :].expand(unpadded.shape[0], heads, length)
        partner_unpadded = torch.gather(unpadded_bh, 2, partner.clamp(0, length - 1).flatten(2)).view(partner.shape)
        valid &= unpadded_bh[..., None] & partner_unpadded
    return valid


def _sparse_forward(q, k, v, offsets, bias, causal, unpadded):
    """(out, lse, probs) for compute-dtype tensors: probs (B, H, L, K) = softmax over the K offsets.

    The logits z[b, h, i, m] = <q_i, k_{i + tau_m}> / sqrt(D) + bias_m are built offset by offset
    into a (B, H, L, K) array; no (B, H, L, K, D) tensor exists.
    """
    length, dim = q.shape[2], q.shape[3]
    shifts = _shifts(offsets, length)
    logits = torch.stack([shift.dot(q, k) for shift in shifts], dim=-1) * (1.0 / math.sqrt(dim))
    if bias is not None:
        logits += bias[:, :, None, :]
    logits.masked_fill_(~_valid(offsets, length, causal, unpadded), _NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - safe[..., None])  # 0 at invalid pairs; rows without a key are all 0
    out = torch.zeros(q.shape[:3] + (v.shape[3],), dtype=v.dtype, device=v.device)
    for m, shift in enumerate(shifts):
        shift.add_shifted(out, probs[..., m], v)
    return out, lse, probs


def _sparse_backward(q, k, v, offsets, probs, lse, out, dout, dlse, has_bias):
    """(dq, dk, dv, dbias) for compute-dtype tensors, from the forward's probabilities.

    dz_m = p_m (<dout_i, v_{i + tau_m}> - <dout_i, out_i> + dlse_i); dq_i = sum_m dz_m k_{i + tau_m} / sqrt(D);
    key j = i + tau_m hears from query i: dk_j += dz_m q_i / sqrt(D), dv_j += p_m dout_i; dbias_m = sum_i dz_m.
    """
    length, dim = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(dim)
    shifts = _shifts(offsets, length)
    row_term = torch.linalg.vecdot(dout, out)
    if dlse is not None:
        row_term -= torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
    dp = torch.stack([shift.dot(dout, v) for shift in shifts], dim=-1)
    dz = probs * (dp - row_term[..., None])
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for m, shift in enumerate(shifts):
        shift.add_shifted(dq, dz[..., m], k)
        shift.add_to_partner(dk, dz[..., m], q)
        shift.add_to_partner(dv, probs[..., m], dout)
    dbias = dz.sum(dim=2) if has_bias else None
    return dq.mul_(scale), dk.mul_(scale), dv, dbias


class _SparseAttention(torch.autograd.Function):
    """(out, lse) = sparse_attention(...); saves q, k, v, offsets, probs, lse and out (O(B H L (K + D)))."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, bias, unpadded, causal):  # type: ignore[override]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, probs = _sparse_forward(q, k, v, offsets, bias, causal, unpadded)
        ctx.save_for_backward(q, k, v, offsets, probs, lse, out)
        ctx.has_bias = bias is not None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, offsets, probs, lse, out = ctx.saved_tensors
        dq, dk, dv, dbias = _sparse_backward(q, k, v, offsets, probs, lse, out, dout.contiguous(), dlse, ctx.has_bias)
        return dq, dk, dv, None, dbias, None, None


def _check_sparse_inputs(q, k, v, offsets, bias, key_padding_mask):
    chk.same_device(q=q, k=k, v=v, offsets=offsets, bias=bias, key_padding_mask=key_padding_mask)
    q = chk.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = chk.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = chk.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    chk.same_dtype(q=q, k=k, v=v)
    offsets = chk.index_tensor(offsets, "offsets", rank=3, axes="(B, H, K)")
    chk.expect_shape(offsets, "offsets", (batch, heads, None), "(B, H, K)")
    if offsets.shape[2] < 1:
        raise ValueError(f"offsets: expected at least one offset per (batch, head), got shape {tuple(offsets.shape)}")
    if chk.checking_values(offsets):
        if bool((offsets.abs() > length - 1).any()):
            raise ValueError(
                f"offsets: expected offsets in [-(L-1), L-1] = [{-(length - 1)}, {length - 1}], "
                f"got values in [{int(offsets.min())}, {int(offsets.max())}]"
            )
        ordered = torch.sort(offsets, dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError("offsets: expected distinct offsets within each (batch, head), got a repeated offset")
    if bias is not None:
        bias = chk.score_tensor(bias, "bias", rank=3, axes="(B, H, K)")
        chk.expect_shape(bias, "bias", tuple(offsets.shape), "(B, H, K)")
    mask = chk.padding_mask(key_padding_mask, batch, length)
    return q, k, v, offsets, bias, mask


def sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    offsets: Any,
    bias: Any = None,
    *,
    causal: bool = False,
    key_padding_mask: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query i to the keys i + tau_m on the selected diagonals, plus bias_m.

    Returns (out (B, H, L, Dv), lse (B, H, L)) of q's dtype; rows without a valid key have out 0
    and lse -inf. Differentiable in q, k, v and bias (a ``torch.autograd.Function``).
    """
    q, k, v, offsets, bias, mask = _check_sparse_inputs(q, k, v, offsets, bias, key_padding_mask)
    dtype = q.dtype
    cd = chk.compute_dtype(dtype)
    bias_c = None if bias is None else bias.to(cd)
    out, lse = _SparseAttention.apply(
        q.to(cd), k.to(cd), v.to(cd), offsets, bias_c, _unpadded(mask), flag(causal, "causal")
    )
    return out.to(dtype), lse.to(dtype)


def sparse_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    offsets: Any,
    bias: Any,
    dout: Any,
    *,
    dlse: Any = None,
    causal: bool = False,
    key_padding_mask: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Vector-Jacobian product of :func:`sparse_attention`: (dq, dk, dv, dbias); dbias None without bias."""
    chk.same_device(q=q, dout=dout, dlse=dlse)
    q, k, v, offsets, bias, mask = _check_sparse_inputs(q, k, v, offsets, bias, key_padding_mask)
    batch, heads, length, _ = q.shape
    dout = chk.sequence(dout, "dout", "(B, H, L, Dv)", (batch, heads, length), feature=v.shape[3])
    if dlse is not None:
        dlse = chk.float_tensor(dlse, "dlse", rank=3, axes="(B, H, L)")
        chk.expect_shape(dlse, "dlse", (batch, heads, length), "(B, H, L)")
    cd = chk.compute_dtype(q.dtype)
    with torch.no_grad():
        qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
        bias_c = None if bias is None else bias.to(cd)
        unpadded = _unpadded(mask)
        out, lse, probs = _sparse_forward(qc, kc, vc, offsets, bias_c, flag(causal, "causal"), unpadded)
        dq, dk, dv, dbias = _sparse_backward(
            qc, kc, vc, offsets, probs, lse, out, dout.to(cd), None if dlse is None else dlse.to(cd), bias is not None
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dbias is None else dbias.to(bias.dtype)


# --------------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------------


def _check_attention_inputs(q, k, v, w, top_k, key_padding_mask, noise, cross_q, cross_k):
    chk.same_device(q=q, k=k, v=v, w=w, key_padding_mask=key_padding_mask, noise=noise, cross_q=cross_q,
                    cross_k=cross_k)
    q = chk.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = chk.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = chk.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    chk.same_dtype(q=q, k=k, v=v)
    if (cross_q is None) != (cross_k is None):
        missing = "cross_k" if cross_k is None else "cross_q"
        raise ValueError(f"{missing}: cross_q and cross_k must be given together (both or neither), got only one")
    if cross_q is not None:
        cross_q = chk.sequence(cross_q, "cross_q", "(B, H, L, Dc)", (batch, heads, length))
        cross_k = chk.sequence(cross_k, "cross_k", "(B, H, L, Dc)", (batch, heads, length), feature=cross_q.shape[3])
        chk.same_dtype(cross_q=cross_q, cross_k=cross_k)
        features = cross_q.shape[3]
    else:
        features = dim
    w = chk.float_tensor(w, "w", rank=2, axes="(H, Dc)")
    chk.expect_shape(w, "w", (heads, features), "(H, Dc)")
    top_k = chk.integer_in_range(top_k, "top_k", low=1)
    mask = chk.padding_mask(key_padding_mask, batch, length)
    if noise is not None:
        noise = chk.float_tensor(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        chk.expect_shape(noise, "noise", (batch, heads, 2 * length - 1), "(B, H, 2L - 1)")
    return q, k, v, w, top_k, mask, noise, cross_q, cross_k


def _plan(q, k, w, top_k, causal, mask, noise, cross_q, cross_k):
    """Steps 1-2 in the compute dtype: (offsets, bias); autograd flows per step 4.

    Without cross inputs the scores come straight from the spectrum of detached q and k
    (:func:`_scores_from_spectrum`); with them, through the differentiable :class:`_Cross`.
    """
    cd = chk.compute_dtype(q.dtype)
    length = q.shape[2]
    unpadded = _unpadded(mask)
    if cross_q is not None:
        c = _Cross.apply(cross_q.to(cd), cross_k.to(cd), unpadded)
        s = _estimate_core(c, w.to(cd), _has_pairs(length, unpadded, q.device))
    else:  # step 4: the estimator path is cut from q and k
        s = _scores_from_spectrum(q.detach().to(cd), k.detach().to(cd), w.to(cd), unpadded)
    noisy = s.detach() if noise is None else s.detach() + noise.detach().to(cd)
    offsets = _select_core(noisy, top_k, causal)
    bias = torch.gather(s, 2, offsets + (length - 1))
    return offsets, bias


def attention(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    top_k: int,
    *,
    causal: bool = False,
    key_padding_mask: Any = None,
    noise: Any = None,
    cross_q: Any = None,
    cross_k: Any = None,
) -> torch.Tensor:
    """FSAT attention: cross -> estimate -> select -> sparse attention with bias s[offsets].

    Returns out (B, H, L, Dv) of q's dtype, differentiable in q, k, v, w, cross_q, cross_k with the
    truncation of spec/fsat.md step 4 (q and k get gradient only through the sparse attention).
    """
    out, _ = attention_with_offsets(q, k, v, w, top_k, causal=causal, key_padding_mask=key_padding_mask,
                                    noise=noise, cross_q=cross_q, cross_k=cross_k)
    return out


def attention_with_offsets(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    top_k: int,
    *,
    causal: bool = False,
    key_padding_mask: Any = None,
    noise: Any = None,
    cross_q: Any = None,
    cross_k: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` that also returns the selected offsets (B, H, K_eff) (used by the module)."""
    q, k, v, w, top_k, mask, noise, cross_q, cross_k = _check_attention_inputs(
        q, k, v, w, top_k, key_padding_mask, noise, cross_q, cross_k
    )
    causal = flag(causal, "causal")
    cd = chk.compute_dtype(q.dtype)
    offsets, bias = _plan(q, k, w, top_k, causal, mask, noise, cross_q, cross_k)
    out, _ = _SparseAttention.apply(q.to(cd), k.to(cd), v.to(cd), offsets, bias, _unpadded(mask), causal)
    return out.to(q.dtype), offsets


def attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    top_k: int,
    dout: Any,
    *,
    causal: bool = False,
    key_padding_mask: Any = None,
    noise: Any = None,
    cross_q: Any = None,
    cross_k: Any = None,
) -> FSATGrads:
    """Gradient of :func:`attention` with the truncation of step 4, as ``FSATGrads``.

    dq, dk, dv from the sparse attention (its explicit backward); dw and the cross fields (only when
    given) are the planning steps' VJP at dbias: ds = dbias scattered to the selected offsets,
    dw = estimate_vjp(c, w, ds).dw, (dcross_q, dcross_k) = cross_vjp(.., dc).
    """
    q, k, v, w, top_k, mask, noise, cross_q, cross_k = _check_attention_inputs(
        q, k, v, w, top_k, key_padding_mask, noise, cross_q, cross_k
    )
    chk.same_device(q=q, dout=dout)
    batch, heads, length, _ = q.shape
    dout = chk.sequence(dout, "dout", "(B, H, L, Dv)", (batch, heads, length), feature=v.shape[3])
    causal = flag(causal, "causal")
    cd = chk.compute_dtype(q.dtype)
    # The planning steps' gradient (dw, and the cross inputs' when given) is their autograd VJP at
    # dbias: the scatter of dbias to the selected offsets, the estimate's and the cross's VJPs.
    w_leaf = w.detach().to(cd).requires_grad_()
    cross_leaves = (None,
                    None) if cross_q is None else tuple(x.detach().to(cd).requires_grad_() for x in (cross_q, cross_k))
    with torch.enable_grad():
        offsets, bias = _plan(q.detach(), k.detach(), w_leaf, top_k, causal, mask, noise, *cross_leaves)
    with torch.no_grad():
        qc, kc, vc = q.detach().to(cd), k.detach().to(cd), v.detach().to(cd)
        out, lse, probs = _sparse_forward(qc, kc, vc, offsets, bias.detach(), causal, _unpadded(mask))
        dq, dk, dv, dbias = _sparse_backward(qc, kc, vc, offsets, probs, lse, out, dout.to(cd), None, True)
    dw, *grads_cross = torch.autograd.grad(bias, [w_leaf, *(x for x in cross_leaves if x is not None)], dbias)
    if cross_q is None:
        grads_cross = [None, None]
    else:
        grads_cross = [grads_cross[0].to(cross_q.dtype), grads_cross[1].to(cross_k.dtype)]
    return FSATGrads(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(w.dtype), *grads_cross)
