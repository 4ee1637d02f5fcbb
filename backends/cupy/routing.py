"""Routing attention on CuPy arrays (spec/routing.md, spec/interface.md): the ``routing`` namespace
of the CuPy backend.

Mirrors the reference refattn.routing step by step, with CuPy array primitives (cuBLAS batched GEMMs
through ``matmul``, ``argsort`` / ``take_along_axis`` for the top-W routing, ``add.at`` / ``bincount``
segmented reductions for the scatter to positions and the centroid statistics):

    gather (B, H, C, W, F) rows -> per-cluster W x W logits (matmul) -> masked softmax -> matmul with
    the gathered values -> scatter-mean back to positions (combine)

Outputs have the inputs' (promoted) floating dtype; float16 is computed in float32. Host-side code is
written against ``xp`` (CuPy, or NumPy inside :func:`refattn.backends.cupy.host_execution`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refattn.checks import centroid_array, flag, integer_in_range, members_array, real_number, shared_keys
from refattn.routing.attention import default_num_clusters, default_window
from refattn.routing.centroids import CentroidState
from refattn.routing.indexing import flat_rows, gather
from refattn.routing.profiles import PROFILE_NAMES, Profile, check_configuration, get_profile

from . import _array
from ._array import (
    expect_shape,
    float_array,
    padding_mask,
    sequence,
)

__all__ = [
    "PROFILE_NAMES",
    "CentroidState",
    "assign",
    "attention",
    "attention_vjp",
    "cluster_attention",
    "cluster_attention_vjp",
    "combine",
    "combine_vjp",
    "commitment_loss",
    "commitment_loss_vjp",
    "default_num_clusters",
    "default_window",
    "init_centroids",
    "local_attention",
    "local_attention_vjp",
    "normalize",
    "normalize_vjp",
    "route",
    "similarity",
    "similarity_vjp",
    "update_centroids",
]

_CHUNK_ELEMENTS = 1 << 24  # logits entries (B * H * chunk * Wq * Wk) per chunk of clusters


# ------------------------------------------------------------------------------- gather and scatter

def _scatter_rows(xp, members, length):
    """Like flat_rows, but empty slots point at one extra row B * H * L (dropped afterwards)."""
    batch, heads = members.shape[:2]
    return xp.where(members >= 0, flat_rows(members, length), batch * heads * length)


def _scatter_add(xp, values, members, length):
    """Segmented sum of the rows values (B, H, C, W, F) into (B, H, L, F) at the members' positions."""
    batch, heads = members.shape[:2]
    features = values.shape[-1]
    out = xp.zeros((batch * heads * length + 1, features), dtype=values.dtype)
    xp.add.at(out, _scatter_rows(xp, members, length).reshape(-1),
              xp.ascontiguousarray(values).reshape(-1, features))
    return out[:-1].reshape(batch, heads, length, features)


def _member_counts(xp, members, length, dtype):
    batch, heads = members.shape[:2]
    counts = xp.bincount(_scatter_rows(xp, members, length).reshape(-1), minlength=batch * heads * length + 1)
    return counts[:-1].reshape(batch, heads, length).astype(dtype)


# -------------------------------------------------------------------------------- step 1: normalize

def _normalize(xp, x, profile: Profile):
    if profile.norm == "layernorm":
        centered = x - x.mean(axis=-1, keepdims=True)
        variance = xp.mean(centered * centered, axis=-1, keepdims=True)
        return centered / xp.sqrt(variance + profile.norm_eps)
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
    return x / xp.maximum(norm, profile.norm_eps)


def _normalize_vjp(xp, x, dy, profile: Profile):
    if profile.norm == "layernorm":
        centered = x - x.mean(axis=-1, keepdims=True)
        sigma = xp.sqrt(xp.mean(centered * centered, axis=-1, keepdims=True) + profile.norm_eps)
        y = centered / sigma
        return (dy - dy.mean(axis=-1, keepdims=True) - y * xp.mean(dy * y, axis=-1, keepdims=True)) / sigma
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
    clamped = norm <= profile.norm_eps
    safe = xp.where(clamped, 1.0, norm).astype(x.dtype)
    y = x / safe
    unit = (dy - y * xp.sum(y * dy, axis=-1, keepdims=True)) / safe
    return xp.where(clamped, dy / profile.norm_eps, unit)


def _any_rank(xp, x, name):
    float_array(xp, x, name)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(
            f"{name}: expected an array whose last axis (D) has at least 1 entry, got shape {tuple(x.shape)}")
    return x


def normalize(x: Any, *, profile: str = "tacl") -> Any:
    """x̂: LayerNorm without affine (tacl) or unit L2 norm (lucidrains) over the last axis."""
    profile = get_profile(profile)
    xp, a = _array.arrays(x=x)
    with _array.device_of(xp, a["x"]):
        x = _any_rank(xp, a["x"], "x")
        return _normalize(xp, _array.acc(x, x.dtype), profile).astype(x.dtype)


def normalize_vjp(x: Any, dx_hat: Any, *, profile: str = "tacl") -> Any:
    """dx of :func:`normalize`."""
    profile = get_profile(profile)
    xp, a = _array.arrays(x=x, dx_hat=dx_hat)
    with _array.device_of(xp, a["x"]):
        x = _any_rank(xp, a["x"], "x")
        dy = float_array(xp, a["dx_hat"], "dx_hat")
        expect_shape(dy, "dx_hat", tuple(x.shape), "like x")
        dtype = _array.result_dtype(x, dy)
        return _normalize_vjp(xp, _array.acc(x, dtype), _array.acc(dy, dtype), profile).astype(dtype)


# ------------------------------------------------------------------------------- step 2: similarity

def similarity(x_hat: Any, centroids: Any) -> Any:
    """S (B, H, L, C) = x̂ μᵀ per head."""
    xp, a = _array.arrays(x_hat=x_hat, centroids=centroids)
    with _array.device_of(xp, a["x_hat"]):
        x_hat = sequence(xp, a["x_hat"], "x_hat", "(B, H, L, D)")
        centroids = centroid_array(a["centroids"], x_hat.shape[1], x_hat.shape[3])
        dtype = _array.result_dtype(x_hat, centroids)
        return _similarity(xp, _array.acc(x_hat, dtype), _array.acc(centroids, dtype)).astype(dtype)


def _similarity(xp, x_hat, centroids):
    return xp.matmul(x_hat, xp.swapaxes(centroids, -1, -2)[None])  # (B, H, L, D) @ (1, H, D, C)


def similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[Any, Any]:
    """(dx_hat, dcentroids) of :func:`similarity`."""
    xp, a = _array.arrays(x_hat=x_hat, centroids=centroids, ds=ds)
    with _array.device_of(xp, a["x_hat"]):
        x_hat = sequence(xp, a["x_hat"], "x_hat", "(B, H, L, D)")
        centroids = centroid_array(a["centroids"], x_hat.shape[1], x_hat.shape[3])
        ds = float_array(xp, a["ds"], "ds", rank=4, axes="(B, H, L, C)")
        expect_shape(ds, "ds", tuple(x_hat.shape[:3]) + (centroids.shape[1],), "(B, H, L, C)")
        dtype = _array.result_dtype(x_hat, centroids, ds)
        x_hat, centroids, ds = (_array.acc(y, dtype) for y in (x_hat, centroids, ds))
        dx_hat = xp.matmul(ds, centroids[None])
        dcentroids = xp.matmul(xp.swapaxes(ds, -1, -2), x_hat).sum(axis=0)
        return dx_hat.astype(dtype), dcentroids.astype(dtype)


# ------------------------------------------------------------------------------------ step 3: route

def _route(xp, scores, window, mask):
    """members (B, H, C, W) from validated similarities (B, H, L, C)."""
    length = scores.shape[2]
    rows = xp.moveaxis(scores, 2, -1)  # (B, H, C, L)
    if mask is not None:
        rows = xp.where(mask[:, None, None, :], -np.inf, rows)
    # Descending similarity; the stable sort keeps equal similarities in position order (lower first).
    order = xp.argsort(-rows, axis=-1, kind="stable")[..., :window]
    if mask is not None:
        padded = xp.take_along_axis(xp.broadcast_to(mask[:, None, None, :], rows.shape), order, axis=-1)
        order = xp.where(padded, length, order)  # fewer than W unpadded tokens: those slots are empty
    members = xp.sort(order, axis=-1)
    return xp.where(members == length, -1, members).astype(np.int64)


def route(similarities: Any, window: int, *, key_padding_mask: Any = None) -> Any:
    """members (B, H, C, W) int64: per centroid the W most similar unpadded tokens (ties: lower
    position), sorted by position, -1 slots last."""
    xp, a = _array.arrays(similarities=similarities, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["similarities"]):
        scores = float_array(xp, a["similarities"], "similarities", rank=4, axes="(B, H, L, C)")
        batch, heads, length, clusters = scores.shape
        if 0 in scores.shape:
            raise ValueError(
                f"similarities: expected every axis of (B, H, L, C) to be at least 1, got shape {tuple(scores.shape)}")
        window = integer_in_range(window, "window", low=1, high=length)
        mask = padding_mask(a["key_padding_mask"], batch, length)
        return _route(xp, _array.acc(scores, scores.dtype), window, mask)


# -------------------------------------------------------------------------- step 4: cluster attention

def _cluster_inputs(xp, a, causal, shared_qk, profile):
    profile = get_profile(profile)
    causal, shared_qk = flag(causal, "causal"), flag(shared_qk, "shared_qk")
    shared_keys(a["k"], shared_qk)
    check_configuration(profile, causal, shared_qk)
    q = sequence(xp, a["q"], "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    if a["k"] is not None:
        sequence(xp, a["k"], "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = sequence(xp, a["v"], "v", "(B, H, L, Dv)", (batch, heads, length))
    qm = members_array(a["q_members"], "q_members", batch, heads, length)
    km = members_array(a["k_members"], "k_members", batch, heads, length)
    if km.shape[2] != qm.shape[2]:
        raise ValueError(
            f"k_members: expected the same number of clusters C = {qm.shape[2]} as q_members, "
            f"got shape {tuple(km.shape)}")
    dtype = _array.result_dtype(q, a["k"], v)
    q, v = _array.acc(q, dtype), _array.acc(v, dtype)
    k = None if a["k"] is None else _array.acc(a["k"], dtype)
    return q, k, v, qm, km, causal, shared_qk, profile, dtype


def _features(xp, q, k, shared_qk, profile):
    if profile.logits_use_normalized:
        f_q = _normalize(xp, q, profile)
        return f_q, (f_q if shared_qk else _normalize(xp, k, profile))
    return q, (_normalize(xp, q, profile) if shared_qk else k)


def _chunks(qm, km):
    batch, heads, clusters, wq = qm.shape
    size = max(1, _CHUNK_ELEMENTS // (batch * heads * wq * km.shape[3]))
    for c0 in range(0, clusters, size):
        yield slice(c0, min(clusters, c0 + size))


def _block(xp, f_q, f_k, v, qm, km, causal, shared_qk, profile, dim):
    """Gathered features and softmax weights of a chunk of clusters (reference: _block)."""
    fq, fk, vg = gather(f_q, qm), gather(f_k, km), gather(v, km)
    logits = xp.matmul(fq, xp.swapaxes(fk, -1, -2))
    if profile.scaled_logits:
        logits = logits * (1.0 / math.sqrt(dim))
    qpos, kpos = qm[..., :, None], km[..., None, :]
    valid = (qpos >= 0) & (kpos >= 0)
    if causal:
        valid = valid & (kpos <= qpos)
    fixed = None
    if shared_qk and profile.self_logit is not None:
        fixed = valid & (kpos == qpos)
        logits = xp.where(fixed, profile.self_logit, logits)
    logits = xp.where(valid, logits, -np.inf)
    peak = logits.max(axis=-1, keepdims=True)
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    weights = xp.exp(logits - peak)
    total = weights.sum(axis=-1, keepdims=True)
    total = xp.where(total == 0, 1.0, total)
    return fq, fk, vg, (weights / total).astype(logits.dtype), fixed


def cluster_attention(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, *, causal: bool = False,
                      shared_qk: bool = False, profile: str = "tacl") -> Any:
    """o (B, H, C, Wq, Dv): dense attention of each cluster's query members to its key members."""
    xp, a = _array.arrays(q=q, k=k, v=v, q_members=q_members, k_members=k_members)
    with _array.device_of(xp, a["q"]):
        q, k, v, qm, km, causal, shared_qk, profile, dtype = _cluster_inputs(xp, a, causal, shared_qk, profile)
        f_q, f_k = _features(xp, q, k, shared_qk, profile)
        batch, heads, clusters, wq = qm.shape
        out = xp.empty((batch, heads, clusters, wq, v.shape[3]), dtype=v.dtype)
        for part in _chunks(qm, km):
            _, _, vg, probs, _ = _block(xp, f_q, f_k, v, qm[:, :, part], km[:, :, part], causal, shared_qk, profile,
                                        q.shape[3])
            out[:, :, part] = xp.matmul(probs, vg)
        return out.astype(dtype)


def _cluster_vjp(xp, q, k, v, qm, km, do, causal, shared_qk, profile):
    length, dim = q.shape[2], q.shape[3]
    f_q, f_k = _features(xp, q, k, shared_qk, profile)
    scale = 1.0 / math.sqrt(dim) if profile.scaled_logits else 1.0
    dfq = xp.zeros_like(f_q)
    dfk = xp.zeros_like(f_k)
    dv = xp.zeros_like(v)
    for part in _chunks(qm, km):
        qp, kp = qm[:, :, part], km[:, :, part]
        fq, fk, vg, probs, fixed = _block(xp, f_q, f_k, v, qp, kp, causal, shared_qk, profile, dim)
        dob = do[:, :, part]
        dp = xp.matmul(dob, xp.swapaxes(vg, -1, -2))
        dz = probs * (dp - xp.sum(probs * dp, axis=-1, keepdims=True))
        if fixed is not None:
            dz = xp.where(fixed, 0.0, dz)
        dfq += _scatter_add(xp, scale * xp.matmul(dz, fk), qp, length)
        dfk += _scatter_add(xp, scale * xp.matmul(xp.swapaxes(dz, -1, -2), fq), kp, length)
        dv += _scatter_add(xp, xp.matmul(xp.swapaxes(probs, -1, -2), dob), kp, length)
    if profile.logits_use_normalized:
        if shared_qk:
            return _normalize_vjp(xp, q, dfq + dfk, profile), None, dv
        return _normalize_vjp(xp, q, dfq, profile), _normalize_vjp(xp, k, dfk, profile), dv
    if shared_qk:
        return dfq + _normalize_vjp(xp, q, dfk, profile), None, dv
    return dfq, dfk, dv


def cluster_attention_vjp(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, do: Any, *, causal: bool = False,
                          shared_qk: bool = False, profile: str = "tacl") -> tuple[Any, Any, Any]:
    """(dq, dk, dv) of :func:`cluster_attention`, membership fixed; dk is None with shared QK."""
    xp, a = _array.arrays(q=q, k=k, v=v, q_members=q_members, k_members=k_members, do=do)
    with _array.device_of(xp, a["q"]):
        q, k, v, qm, km, causal, shared_qk, profile, dtype = _cluster_inputs(xp, a, causal, shared_qk, profile)
        do = float_array(xp, a["do"], "do", rank=5, axes="(B, H, C, W, Dv)")
        expect_shape(do, "do", tuple(qm.shape) + (v.shape[3],), "(B, H, C, W, Dv)")
        dtype = np.result_type(dtype, do.dtype)
        grads = _cluster_vjp(xp, q, k, v, qm, km, _array.acc(do, dtype), causal, shared_qk, profile)
        return tuple(None if g is None else g.astype(dtype) for g in grads)


# ---------------------------------------------------------------------------------- step 5: combine

def combine(o: Any, q_members: Any, length: int, *, profile: str = "tacl") -> Any:
    """out (B, H, L, Dv): the sum of a token's cluster outputs / (count + ε)."""
    profile = get_profile(profile)
    length = integer_in_range(length, "length", low=1)
    xp, a = _array.arrays(o=o, q_members=q_members)
    with _array.device_of(xp, a["o"]):
        o = float_array(xp, a["o"], "o", rank=5, axes="(B, H, C, W, Dv)")
        members = members_array(a["q_members"], "q_members", o.shape[0], o.shape[1], length)
        if tuple(members.shape) != tuple(o.shape[:4]):
            raise ValueError(
                f"q_members: expected shape (B, H, C, W) = {tuple(o.shape[:4])} (that of o), "
                f"got {tuple(members.shape)}")
        total = _scatter_add(xp, _array.acc(o, o.dtype), members, length)
        counts = _member_counts(xp, members, length, total.dtype)
        return (total / (counts + profile.combine_eps)[..., None]).astype(o.dtype)


def _combine_vjp(xp, members, dout, profile):
    batch, heads, length, features = dout.shape
    scaled = dout / (_member_counts(xp, members, length, dout.dtype) + profile.combine_eps)[..., None]
    do = scaled.reshape(batch * heads * length, features)[flat_rows(members, length)]
    return xp.where((members >= 0)[..., None], do, 0.0).astype(dout.dtype)


def combine_vjp(q_members: Any, dout: Any, *, profile: str = "tacl") -> Any:
    """do (B, H, C, W, Dv) of :func:`combine` (linear in o); 0 at empty slots."""
    profile = get_profile(profile)
    xp, a = _array.arrays(q_members=q_members, dout=dout)
    with _array.device_of(xp, a["dout"]):
        dout = float_array(xp, a["dout"], "dout", rank=4, axes="(B, H, L, Dv)")
        batch, heads, length, _ = dout.shape
        members = members_array(a["q_members"], "q_members", batch, heads, length)
        return _combine_vjp(xp, members, _array.acc(dout, dout.dtype), profile).astype(dout.dtype)


# ------------------------------------------------------------------------------ step 6: local attention

def _local_layout(length, block):
    block = min(block, length)
    blocks = -(-length // block)
    queries = np.arange(blocks * block).reshape(blocks, block)
    keys = np.concatenate([queries - block, queries, queries + block], axis=1)
    return block, blocks, keys, queries


def _padded_rows(xp, x, total):
    extra = total - x.shape[2]
    if extra == 0:
        return x
    return xp.concatenate([x, xp.zeros(tuple(x.shape[:2]) + (extra, x.shape[3]), dtype=x.dtype)], axis=2)


def _local_forward(xp, q, k, v, layout, causal, mask):
    batch, heads, length, dim = q.shape
    width, n, keys, queries = layout
    total = n * width
    qb = _padded_rows(xp, q, total).reshape(batch, heads, n, width, dim)
    key_index = xp.asarray(np.clip(keys, 0, total - 1))
    kb = _padded_rows(xp, k, total)[:, :, key_index]  # (B, H, N, 3W, D)
    vb = _padded_rows(xp, v, total)[:, :, key_index]
    valid = (keys >= 0) & (keys < length)
    valid = np.broadcast_to(valid[:, None, :], (n, width, 3 * width)) & (queries < length)[:, :, None]
    if causal:
        valid = valid & (keys[:, None, :] <= queries[:, :, None])
    valid = xp.asarray(valid)[None, None]
    if mask is not None:
        unpadded = xp.concatenate([~mask, xp.zeros((batch, total - length), dtype=bool)], axis=1)
        key_ok = unpadded[:, key_index]  # (B, N, 3W)
        query_ok = unpadded.reshape(batch, n, width)
        valid = valid & (key_ok[:, None, :, None, :] & query_ok[:, None, :, :, None])
    logits = xp.matmul(qb, xp.swapaxes(kb, -1, -2)) / math.sqrt(dim)
    logits = xp.where(valid, logits, -np.inf)
    peak = logits.max(axis=-1, keepdims=True)
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    probs = xp.exp(logits - peak)
    total_w = probs.sum(axis=-1, keepdims=True)
    probs = probs / xp.where(total_w == 0, 1.0, total_w)
    out = xp.matmul(probs, vb)
    return qb, kb, vb, key_index, probs, out.reshape(batch, heads, total, -1)[:, :, :length]


def _local_inputs(xp, a, block):
    q = sequence(xp, a["q"], "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = sequence(xp, a["k"], "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = sequence(xp, a["v"], "v", "(B, H, L, Dv)", (batch, heads, length))
    block = integer_in_range(block, "block", low=1)
    mask = padding_mask(a["key_padding_mask"], batch, length)
    dtype = _array.result_dtype(q, k, v)
    return _array.acc(q, dtype), _array.acc(k, dtype), _array.acc(v, dtype), block, mask, dtype


def local_attention(q: Any, k: Any, v: Any, block: int, *, causal: bool = False, key_padding_mask: Any = None) -> Any:
    """Blocked local attention (the other heads): query block n sees key blocks n - 1, n (and n + 1 unless causal)."""
    xp, a = _array.arrays(q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["q"]):
        q, k, v, block, mask, dtype = _local_inputs(xp, a, block)
        out = _local_forward(xp, q, k, v, _local_layout(q.shape[2], block), flag(causal, "causal"), mask)[-1]
        return xp.ascontiguousarray(out).astype(dtype)


def local_attention_vjp(q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False,
                        key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """(dq, dk, dv) of :func:`local_attention`; the key-side sums are segmented sums (add.at)."""
    xp, a = _array.arrays(q=q, k=k, v=v, dout=dout, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["q"]):
        q, k, v, block, mask, dtype = _local_inputs(xp, a, block)
        batch, heads, length, dim = q.shape
        dout = float_array(xp, a["dout"], "dout", rank=4, axes="(B, H, L, Dv)")
        expect_shape(dout, "dout", (batch, heads, length, v.shape[3]), "(B, H, L, Dv)")
        dtype = np.result_type(dtype, dout.dtype)
        dout = _array.acc(dout, dtype)
        layout = _local_layout(length, block)
        qb, kb, vb, key_index, probs, _ = _local_forward(xp, q, k, v, layout, flag(causal, "causal"), mask)
        width, n = layout[0], layout[1]
        total = n * width
        dob = _padded_rows(xp, dout, total).reshape(batch, heads, n, width, -1)
        dp = xp.matmul(dob, xp.swapaxes(vb, -1, -2))
        dz = probs * (dp - xp.sum(probs * dp, axis=-1, keepdims=True)) / math.sqrt(dim)
        dq = xp.matmul(dz, kb).reshape(batch, heads, total, dim)[:, :, :length]
        dkb = xp.matmul(xp.swapaxes(dz, -1, -2), qb)  # (B, H, N, 3W, D)
        dvb = xp.matmul(xp.swapaxes(probs, -1, -2), dob)
        rows = (xp.arange(batch * heads, dtype=np.int64) * total)[:, None] + key_index.reshape(-1)[None, :]
        grads = []
        for values in (dkb, dvb):
            features = values.shape[-1]
            target = xp.zeros((batch * heads * total, features), dtype=values.dtype)
            # invalid key slots carry weight 0, so their clipped target row is harmless
            xp.add.at(target, rows.reshape(-1), xp.ascontiguousarray(values).reshape(-1, features))
            grads.append(target.reshape(batch, heads, total, features)[:, :, :length])
        return tuple(xp.ascontiguousarray(g).astype(dtype) for g in (dq, grads[0], grads[1]))


# ------------------------------------------------------------------------------- step 7: centroids

def _assign(xp, x_hat, centroids, mask):
    """Nearest centroid by the largest similarity, ties to the lower index; -1 at padding."""
    scores = _similarity(xp, x_hat, centroids)
    best = scores.max(axis=-1, keepdims=True)
    clusters = centroids.shape[1]
    labels = xp.where(scores == best, xp.arange(clusters), clusters).min(axis=-1).astype(np.int64)
    if mask is not None:
        labels = xp.where(mask[:, None, :], -1, labels)
    return labels


def assign(x_hat: Any, centroids: Any, *, key_padding_mask: Any = None) -> Any:
    """(B, H, L) int64 nearest centroid (ties: the lower index), -1 at padded positions."""
    xp, a = _array.arrays(x_hat=x_hat, centroids=centroids, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["x_hat"]):
        x_hat = sequence(xp, a["x_hat"], "x_hat", "(B, H, L, D)")
        centroids = centroid_array(a["centroids"], x_hat.shape[1], x_hat.shape[3])
        mask = padding_mask(a["key_padding_mask"], x_hat.shape[0], x_hat.shape[2])
        dtype = _array.result_dtype(x_hat, centroids)
        return _assign(xp, _array.acc(x_hat, dtype), _array.acc(centroids, dtype), mask)


def init_centroids(num_heads: int, num_clusters: int, dim: int, *, rng: np.random.Generator,
                   profile: str = "tacl") -> CentroidState:
    """Initial centroids from ``rng.standard_normal((H, C, D))`` (one draw, as the reference), normalized
    on the host in float64 and moved to the current device (NumPy arrays inside host_execution)."""
    profile = get_profile(profile)
    heads = integer_in_range(num_heads, "num_heads", low=1)
    clusters = integer_in_range(num_clusters, "num_clusters", low=1)
    dim = integer_in_range(dim, "dim", low=1)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    means = _normalize(np, rng.standard_normal((heads, clusters, dim)), profile)
    xp, _ = _array.arrays()
    means = xp.asarray(means)
    return CentroidState(means, xp.zeros((heads, clusters)), means.copy())


def _statistics(xp, x_hat, means, mask):
    heads, clusters, dim = means.shape
    labels = _assign(xp, x_hat, means, mask)  # (B, H, L)
    head_index = xp.arange(heads)[None, :, None]
    flat = xp.where(labels >= 0, head_index * clusters + labels, heads * clusters)  # padding: an extra bin
    counts = xp.bincount(flat.reshape(-1), minlength=heads * clusters + 1)[:-1]
    sums = xp.zeros((heads * clusters + 1, dim), dtype=x_hat.dtype)
    xp.add.at(sums, flat.reshape(-1), xp.ascontiguousarray(x_hat).reshape(-1, dim))
    return counts.reshape(heads, clusters).astype(x_hat.dtype), sums[:-1].reshape(heads, clusters, dim)


def update_centroids(state: CentroidState, q_hat: Any, k_hat: Any = None, *, profile: str = "tacl",
                     key_padding_mask: Any = None, decay: float = 0.999) -> CentroidState:
    """One k-means step (tacl: VQ-VAE EMA with Laplace smoothing; lucidrains: spherical mean EMA)."""
    profile = get_profile(profile)
    if not isinstance(state, tuple) or len(state) != 3:
        raise TypeError(f"state: expected a CentroidState (means, counts, sums), got {type(state).__name__}")
    xp, a = _array.arrays(means=state[0], counts=state[1], sums=state[2], q_hat=q_hat, k_hat=k_hat,
                          key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["means"]):
        means = centroid_array(a["means"], None, None, "state.means")
        heads, clusters, dim = means.shape
        counts = float_array(xp, a["counts"], "state.counts", rank=2, axes="(H, C)")
        expect_shape(counts, "state.counts", (heads, clusters), "(H, C)")
        sums = float_array(xp, a["sums"], "state.sums", rank=3, axes="(H, C, D)")
        expect_shape(sums, "state.sums", (heads, clusters, dim), "(H, C, D)")
        q_hat = sequence(xp, a["q_hat"], "q_hat", "(B, H, L, D)")
        expect_shape(q_hat, "q_hat", (None, heads, None, dim), "(B, H, L, D) with H, D of the state")
        batch, _, length, _ = q_hat.shape
        inputs = [q_hat]
        if a["k_hat"] is not None:
            inputs.append(sequence(xp, a["k_hat"], "k_hat", "(B, H, L, D)", (batch, heads, length), feature=dim))
        mask = padding_mask(a["key_padding_mask"], batch, length)
        decay = real_number(decay, "decay", low=0.0, high=1.0)
        dtype = _array.result_dtype(means, counts, sums, *inputs)
        means, counts, sums = (_array.acc(y, dtype) for y in (means, counts, sums))
        stats = [_statistics(xp, _array.acc(x, dtype), means, mask) for x in inputs]
        if profile.update == "vqvae_ema":
            for batch_counts, batch_sums in stats:
                counts = decay * counts + (1.0 - decay) * batch_counts
                sums = decay * sums + (1.0 - decay) * batch_sums
            total = counts.sum(axis=-1, keepdims=True)
            smoothed = (counts + profile.laplace_eps) / (total + clusters * profile.laplace_eps) * total
            new = xp.where(total[..., None] > 0, sums / xp.where(smoothed > 0, smoothed, 1.0)[..., None], means)
            return CentroidState(new.astype(dtype), counts.astype(dtype), sums.astype(dtype))
        batch_counts = sum(c for c, _ in stats)
        batch_sums = sum(s for _, s in stats)
        norm = xp.sqrt(xp.sum(batch_sums * batch_sums, axis=-1, keepdims=True))
        batch_means = xp.where(batch_counts[..., None] > 0, batch_sums / xp.maximum(norm, profile.norm_eps), means)
        new = decay * means + (1.0 - decay) * batch_means
        return CentroidState(new.astype(dtype), counts.astype(dtype), sums.astype(dtype))


# ------------------------------------------------------------------------------ step 8: commitment

def _residual(xp, a):
    x_hat = sequence(xp, a["x_hat"], "x_hat", "(B, H, L, D)")
    centroids = centroid_array(a["centroids"], x_hat.shape[1], x_hat.shape[3])
    mask = padding_mask(a["key_padding_mask"], x_hat.shape[0], x_hat.shape[2])
    dtype = _array.result_dtype(x_hat, centroids)
    x_hat, centroids = _array.acc(x_hat, dtype), _array.acc(centroids, dtype)
    labels = _assign(xp, x_hat, centroids, mask)
    keep = labels >= 0
    heads = xp.arange(x_hat.shape[1])[None, :, None]
    chosen = centroids[heads, xp.maximum(labels, 0)]  # (B, H, L, D)
    residual = xp.where(keep[..., None], x_hat - chosen, 0.0)
    return residual, int(xp.count_nonzero(keep)) * x_hat.shape[3], dtype


def commitment_loss(x_hat: Any, centroids: Any, *, beta: float = 1e-4, key_padding_mask: Any = None) -> float:
    """β · mean over the unpadded tokens' elements of (x̂ - μ_a(x̂))², a Python float as in the reference
    (reading it back synchronises with the device)."""
    beta = real_number(beta, "beta", low=0.0)
    xp, a = _array.arrays(x_hat=x_hat, centroids=centroids, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["x_hat"]):
        residual, count, _ = _residual(xp, a)
        return 0.0 if count == 0 else beta * float(xp.sum(residual * residual)) / count


def commitment_loss_vjp(x_hat: Any, centroids: Any, dloss: float = 1.0, *, beta: float = 1e-4,
                        key_padding_mask: Any = None) -> Any:
    """dx̂ = dloss · 2β (x̂ - μ_a(x̂)) / (N D), 0 at padding (the centroids get none)."""
    beta = real_number(beta, "beta", low=0.0)
    dloss = real_number(dloss, "dloss")
    xp, a = _array.arrays(x_hat=x_hat, centroids=centroids, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["x_hat"]):
        residual, count, dtype = _residual(xp, a)
        factor = 0.0 if count == 0 else 2.0 * beta * dloss / count
        return (residual * factor).astype(dtype)


# ------------------------------------------------------------------------------------- the pipeline

def _pipeline_inputs(xp, a, window, causal, shared_qk, profile):
    profile = get_profile(profile)
    causal, shared_qk = flag(causal, "causal"), flag(shared_qk, "shared_qk")
    shared_keys(a["k"], shared_qk)
    check_configuration(profile, causal, shared_qk)
    q = sequence(xp, a["q"], "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = a["k"]
    if k is not None:
        sequence(xp, k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = sequence(xp, a["v"], "v", "(B, H, L, Dv)", (batch, heads, length))
    centroids = centroid_array(a["centroids"], heads, dim)
    if window is None:
        window = default_window(length, centroids.shape[1])
    window = integer_in_range(window, "window", low=1, high=length)
    mask = padding_mask(a["key_padding_mask"], batch, length)
    dtype = _array.result_dtype(q, k, v, centroids)
    q, v, centroids = (_array.acc(y, dtype) for y in (q, v, centroids))
    k = None if k is None else _array.acc(k, dtype)
    return q, k, v, centroids, window, causal, shared_qk, profile, mask, dtype


def _members(xp, q, k, centroids, window, profile, mask, shared_qk):
    q_members = _route(xp, _similarity(xp, _normalize(xp, q, profile), centroids), window, mask)
    if shared_qk:
        return q_members, q_members
    return q_members, _route(xp, _similarity(xp, _normalize(xp, k, profile), centroids), window, mask)


def attention(q: Any, k: Any, v: Any, centroids: Any, *, window: int | None = None, causal: bool = False,
              shared_qk: bool = False, profile: str = "tacl", key_padding_mask: Any = None) -> Any:
    """Routing attention: normalize -> similarity -> route -> cluster attention -> combine."""
    xp, a = _array.arrays(q=q, k=k, v=v, centroids=centroids, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["q"]):
        q, k, v, centroids, window, causal, shared_qk, profile, mask, dtype = _pipeline_inputs(
            xp, a, window, causal, shared_qk, profile)
        qm, km = _members(xp, q, k, centroids, window, profile, mask, shared_qk)
        f_q, f_k = _features(xp, q, k, shared_qk, profile)
        batch, heads, clusters, wq = qm.shape
        o = xp.empty((batch, heads, clusters, wq, v.shape[3]), dtype=v.dtype)
        for part in _chunks(qm, km):
            _, _, vg, probs, _ = _block(xp, f_q, f_k, v, qm[:, :, part], km[:, :, part], causal, shared_qk, profile,
                                        q.shape[3])
            o[:, :, part] = xp.matmul(probs, vg)
        length = q.shape[2]
        total = _scatter_add(xp, o, qm, length)
        counts = _member_counts(xp, qm, length, total.dtype)
        return (total / (counts + profile.combine_eps)[..., None]).astype(dtype)


def attention_vjp(q: Any, k: Any, v: Any, centroids: Any, dout: Any, *, window: int | None = None,
                  causal: bool = False, shared_qk: bool = False, profile: str = "tacl",
                  key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """(dq, dk, dv) of :func:`attention` with the membership held fixed; dk is None with shared QK."""
    xp, a = _array.arrays(q=q, k=k, v=v, centroids=centroids, dout=dout, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["q"]):
        q, k, v, centroids, window, causal, shared_qk, profile, mask, dtype = _pipeline_inputs(
            xp, a, window, causal, shared_qk, profile)
        dout = float_array(xp, a["dout"], "dout", rank=4, axes="(B, H, L, Dv)")
        expect_shape(dout, "dout", tuple(v.shape), "(B, H, L, Dv)")
        dtype = np.result_type(dtype, dout.dtype)
        qm, km = _members(xp, q, k, centroids, window, profile, mask, shared_qk)
        do = _combine_vjp(xp, qm, _array.acc(dout, dtype), profile)
        grads = _cluster_vjp(xp, q, k, v, qm, km, do, causal, shared_qk, profile)
        return tuple(None if g is None else g.astype(dtype) for g in grads)
