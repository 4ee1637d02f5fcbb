"""FSAT step 3: attention restricted to the selected diagonals, reweighted by the estimate (spec/fsat.md, step 3).

For query i and selected offset tau_m (m = 0 .. K-1), with key j = i + tau_m:

    z_{i,m} = q_i . k_j / sqrt(D) + bias_m,   a_{i,m} = softmax_m(z_{i,m}),   o_i = sum_m a_{i,m} v_j

over the *valid* m only: 0 <= j < L, j <= i when causal, and neither i nor j padding. There are no
index arrays of size L x K x D: for each selected offset the keys are the rows of k shifted by
tau_m, so the logits are a shifted, masked, row-wise dot product, and the loop runs over the K
offsets only.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from refattn import checks
from refattn.checks import as_float64

__all__ = [
    "sparse_attention",
    "sparse_attention_vjp",
    "check_sparse_attention",
    "check_sparse_attention_vjp",
    "sparse_attention_core",
    "sparse_attention_vjp_core",
]


def check_sparse_attention(
    q: Any, k: Any, v: Any, offsets: Any, bias: Any = None, causal: Any = False, key_padding_mask: Any = None
) -> tuple[Any, Any, Any, Any, Any, bool, Any]:
    """Validate the arguments of :func:`sparse_attention`; returns them in that order (offsets as int64)."""
    q, k, v, offsets, bias, key_padding_mask = checks.arrays(
        q=q, k=k, v=v, offsets=offsets, bias=bias, key_padding_mask=key_padding_mask
    )
    q = checks.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = checks.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = checks.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    offsets = checks.offsets_array(offsets, batch, heads, length)
    if bias is not None:
        bias = checks.float_array(bias, "bias", rank=3, axes="(B, H, K)", allow_neg_inf=True)
        checks.expect_shape(bias, "bias", offsets.shape, "(B, H, K)")
    causal = checks.flag(causal, "causal")
    mask = checks.padding_mask(key_padding_mask, batch, length)
    return q, k, v, offsets, bias, causal, mask


def _shifted(x: Any, shift: Any, *, fill: bool = True) -> Any:
    """y[b, h, i] = x[b, h, i + shift[b, h]] for x (B, H, L, F) or (B, H, L), shift (B, H) integers.

    Where i + shift falls outside [0, L) the row is 0 (False for bool x), or, with ``fill=False``,
    an arbitrary row of x (for callers that give those rows weight 0 anyway). A row gather on the
    flattened (B * H * L, F) array: no index array has more than B * H * L entries.
    """
    xp = checks.array_namespace(x, shift)
    batch, heads, length = x.shape[:3]
    target = xp.arange(length)[None, None, :] + shift[:, :, None]
    base = (xp.arange(batch * heads) * length).reshape(batch, heads, 1)
    rows = base + xp.clip(target, 0, length - 1)
    gathered = x.reshape((batch * heads * length,) + x.shape[3:])[rows]
    if not fill:
        return gathered
    outside = (target < 0) | (target >= length)
    if x.ndim == 4:
        outside = outside[..., None]
    gathered[xp.broadcast_to(outside, gathered.shape)] = 0
    return gathered


def _valid_pairs(shape: tuple[int, ...], shift: Any, causal: bool, mask: Any) -> Any:
    """(B, H, L) bool: is (i, i + shift) a valid query/key pair (in range, causal, both unpadded)?"""
    xp = checks.array_namespace(shift)
    batch, heads, length = shape[:3]
    target = xp.arange(length)[None, None, :] + shift[:, :, None]
    valid = (target >= 0) & (target < length)
    if causal:
        valid &= (shift <= 0)[:, :, None]
    if mask is not None:
        unpadded = xp.broadcast_to(~mask[:, None, :], (batch, heads, length))
        valid &= unpadded & _shifted(unpadded, shift)
    return valid


class _Forward(NamedTuple):
    valid: Any  # (B, H, L, K) bool, valid query/key pairs
    probs: Any  # (B, H, L, K) softmax weights, 0 at invalid pairs
    lse: Any  # (B, H, L), -inf for rows without a valid key
    out: Any  # (B, H, L, Dv)


def _forward(q: Any, k: Any, v: Any, offsets: Any, bias: Any, causal: bool, mask: Any) -> _Forward:
    xp = checks.array_namespace(q, k, v)
    count = offsets.shape[2]
    scale = 1.0 / math.sqrt(q.shape[3])
    logits = xp.full(q.shape[:3] + (count,), -np.inf, dtype=q.dtype)
    valid = xp.zeros(q.shape[:3] + (count,), dtype=bool)
    for m in range(count):
        shift = offsets[:, :, m]
        valid[..., m] = _valid_pairs(q.shape, shift, causal, mask)
        z = xp.einsum("bhld,bhld->bhl", q, _shifted(k, shift, fill=False)) * scale
        if bias is not None:  # a bias of -inf removes its offset, whatever q . k is (spec: bias_m > -inf)
            removed = bias[:, :, m, None] == -np.inf
            valid[..., m] &= ~removed
            z = z + xp.where(removed, 0.0, bias[:, :, m, None])
        logits[..., m] = xp.where(valid[..., m], z, -np.inf)
    # q . k overflowing to -inf gives its pair weight 0 like an invalid one; +inf and NaN stay in and make
    # lse NaN, which the callers report.
    valid &= logits != -np.inf
    peak = logits.max(axis=-1)
    has_key = peak != -np.inf
    peak = xp.where(has_key, peak, 0.0)
    weights = xp.exp(logits - peak[..., None])  # exp(-inf) = 0 at invalid pairs
    total = weights.sum(axis=-1)
    safe_total = xp.where(has_key, total, 1.0)
    probs = weights / safe_total[..., None]
    lse = xp.where(has_key, peak + xp.log(safe_total), -np.inf)
    out = xp.zeros(q.shape[:3] + (v.shape[3],), dtype=v.dtype)
    for m in range(count):
        out += probs[..., m, None] * _shifted(v, offsets[:, :, m], fill=False)
    return _Forward(valid, probs, lse, out)


def sparse_attention_core(
    q: Any, k: Any, v: Any, offsets: Any, bias: Any = None, *, causal: bool = False, key_padding_mask: Any = None
) -> tuple[Any, Any]:
    """:func:`sparse_attention` of validated arguments (q, k, v and bias of one floating dtype,
    offsets int64), computed and returned in that dtype."""
    xp = checks.array_namespace(q, k, v)
    q, k, v = (xp.ascontiguousarray(x) for x in (q, k, v))  # the row gathers reshape without copying
    result = _forward(q, k, v, offsets, bias, causal, key_padding_mask)
    return result.out, result.lse


# The overflow checks of the results (refattn.checks.Overflow): lse is -inf on rows with no valid key.
_GRADIENT = "the gradient of the sparse attention"
OVERFLOWS = {
    "sparse_attention": (None, checks.Overflow("the sparse attention", ("q", "k"), allow_neg_inf=True)),
    "sparse_attention_vjp": (checks.Overflow(_GRADIENT, ("dout", "v", "k")),
                             checks.Overflow(_GRADIENT, ("dout", "v", "q")), checks.Overflow(_GRADIENT, ("dout",)),
                             checks.Overflow(_GRADIENT, ("dout", "v"))),
}


def sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    offsets: Any,
    bias: Any = None,
    *,
    causal: bool = False,
    key_padding_mask: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Attention of every query to the keys on the selected diagonals, with a per-offset logit bias.

        z_{i,m} = q_i . k_{i+tau_m} / sqrt(D) + bias_m
        out_i   = sum_m softmax_m(z_{i,m}) v_{i+tau_m},    lse_i = log sum_m exp(z_{i,m})

    the softmax and the log-sum-exp running over the valid pairs only: 0 <= i + tau_m < L, causal
    tau_m <= 0, i and i + tau_m both unpadded (and bias_m > -inf).

    Args:
        q, k: (B, H, L, D); v: (B, H, L, Dv), Dv may differ from D.
        offsets: (B, H, K) integers in [-(L-1), L-1], distinct per (batch, head), any order.
        bias: optional (B, H, K), aligned with ``offsets``: bias[b, h, m] is added to every logit of
            offset offsets[b, h, m]; finite or -inf (-inf removes that offset). None means 0.
        causal: keep only keys j <= i.
        key_padding_mask: optional bool (B, L), True = padding (masks keys and queries alike).

    Returns:
        (out (B, H, L, Dv), lse (B, H, L)), float64. A padded query row, or a row with no valid
        key (e.g. causal with only positive offsets, or all its keys padded) has out = 0 and
        lse = -inf. The softmax is computed max-subtracted (log-sum-exp stable).

    Cost O(L * K * (D + Dv)) time, O(L * (K + D + Dv)) memory per (batch, head).
    """
    q, k, v, offsets, bias, causal, key_padding_mask = check_sparse_attention(
        q, k, v, offsets, bias, causal, key_padding_mask
    )
    q, k, v, bias = as_float64(q, k, v, bias)
    out, lse = sparse_attention_core(q, k, v, offsets, bias, causal=causal, key_padding_mask=key_padding_mask)
    checks.check_overflows((out, lse), OVERFLOWS["sparse_attention"], q=q, k=k)
    return out, lse


def check_sparse_attention_vjp(
    q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, dlse: Any = None, causal: Any = False,
    key_padding_mask: Any = None,
) -> tuple[Any, Any, Any, Any, Any, Any, Any, bool, Any]:
    """Validate the arguments of :func:`sparse_attention_vjp`; returns them in that order."""
    q, k, v, offsets, bias, causal, key_padding_mask = check_sparse_attention(
        q, k, v, offsets, bias, causal, key_padding_mask
    )
    dout, dlse = checks.arrays(dout=dout, dlse=dlse)
    dout = checks.sequence(dout, "dout", "(B, H, L, Dv)", q.shape[:3], feature=v.shape[3])
    if dlse is not None:
        dlse = checks.float_array(dlse, "dlse", rank=3, axes="(B, H, L)")
        checks.expect_shape(dlse, "dlse", q.shape[:3], "(B, H, L)")
    return q, k, v, offsets, bias, dout, dlse, causal, key_padding_mask


def sparse_attention_vjp_core(
    q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, *, dlse: Any = None, causal: bool = False,
    key_padding_mask: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """:func:`sparse_attention_vjp` of validated arguments of one floating dtype, computed and
    returned in that dtype."""
    xp = checks.array_namespace(q, k, v)
    q, k, v = (xp.ascontiguousarray(x) for x in (q, k, v))
    fwd = _forward(q, k, v, offsets, bias, causal, key_padding_mask)
    count = offsets.shape[2]
    scale = 1.0 / math.sqrt(q.shape[3])
    row_term = xp.einsum("bhlv,bhlv->bhl", dout, fwd.out)
    if dlse is not None:
        row_term = row_term - xp.where(xp.isfinite(fwd.lse), dlse, 0.0)
    dz = xp.empty_like(fwd.probs)
    for m in range(count):
        dp = xp.einsum("bhlv,bhlv->bhl", dout, _shifted(v, offsets[:, :, m]))
        dz[..., m] = xp.where(fwd.valid[..., m], fwd.probs[..., m] * (dp - row_term), 0.0)
    dq = xp.zeros_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    for m in range(count):
        shift = offsets[:, :, m]
        dq += dz[..., m, None] * _shifted(k, shift)
        # Key j hears from query i = j - tau_m; dz and p are 0 wherever that pair is invalid.
        dk += _shifted(dz[..., m, None] * q, -shift)
        dv += _shifted(fwd.probs[..., m, None] * dout, -shift)
    dq *= scale
    dk *= scale
    dbias = dz.sum(axis=2) if bias is not None else None
    return dq, dk, dv, dbias


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Vector-Jacobian product of :func:`sparse_attention`.

    With p_{i,m} the softmax weights (0 at invalid pairs), j = i + tau_m and s = 1/sqrt(D):

        dp_{i,m} = dout_i . v_j
        dz_{i,m} = p_{i,m} * (dp_{i,m} - dout_i . out_i + dlse_i)
        dq_i     = s * sum_m dz_{i,m} k_j
        dk_j     = s * sum_m dz_{j-tau_m,m} q_{j-tau_m}
        dv_j     = sum_m p_{j-tau_m,m} dout_{j-tau_m}
        dbias_m  = sum_i dz_{i,m}

    The scatter to keys is written as a gather at i = j - tau_m (one key per query per offset, so
    no two queries of one offset share a key). Rows without a valid key get no gradient; ``dlse``
    there is ignored.

    Args:
        q, k, v, offsets, bias, causal, key_padding_mask: the forward inputs (bias may be None).
        dout: cotangent of out, (B, H, L, Dv).
        dlse: optional cotangent of lse, (B, H, L); None means 0.

    Returns:
        (dq, dk, dv, dbias) float64; dbias is None when bias is None. The offsets get no gradient.
    """
    q, k, v, offsets, bias, dout, dlse, causal, key_padding_mask = check_sparse_attention_vjp(
        q, k, v, offsets, bias, dout, dlse, causal, key_padding_mask
    )
    q, k, v, bias, dout, dlse = as_float64(q, k, v, bias, dout, dlse)
    dq, dk, dv, dbias = sparse_attention_vjp_core(
        q, k, v, offsets, bias, dout, dlse=dlse, causal=causal, key_padding_mask=key_padding_mask
    )
    checks.check_overflows((dq, dk, dv, dbias), OVERFLOWS["sparse_attention_vjp"], q=q, k=k, v=v, dout=dout)
    return dq, dk, dv, dbias
