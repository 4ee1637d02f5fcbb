"""Naive Routing-attention oracles: the definitions of spec/routing.md written out literally, for tests only.

These functions are test oracles, slow on purpose: membership is a full sort with the tie-break
rule spelled out as a Python key; routed attention visits every query token, every cluster that
holds it, and every key of that cluster, as Python sets and loops; local attention is a dense
L x L masked softmax. They share no code with ``refattn.routing`` (they import nothing from it) so
that agreement between the two is evidence, not tautology. Use them at small sizes only.

Conventions are those of spec/interface.md: arrays (B, H, L, .), key_padding_mask bool (B, L) with
True = padding, centroids (H, C, D), members (B, H, C, W) int64 with -1 = empty slot. The profile
constants are written out again here, deliberately, from spec/routing.md.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "normalize",
    "route",
    "cluster_attention",
    "routed_attention",
    "attention",
    "local_attention",
    "assign",
    "commitment_loss",
    "update_centroids",
]

# spec/routing.md, "Profiles" (restated here, not imported).
_LN_EPS = 1e-6
_L2_EPS = 1e-12
_COMBINE_EPS = {"tacl": 1e-2, "lucidrains": 1e-5}
_SELF_LOGIT = -5e4


def _unpadded(mask, batch: int, length: int) -> np.ndarray:
    if mask is None:
        return np.ones((batch, length), dtype=bool)
    return ~np.asarray(mask, dtype=bool)


def _normalize_row(x: np.ndarray, profile: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if profile == "tacl":
        mean = sum(x) / len(x)
        variance = sum((xi - mean) ** 2 for xi in x) / len(x)
        return np.array([(xi - mean) / math.sqrt(variance + _LN_EPS) for xi in x])
    norm = math.sqrt(sum(xi * xi for xi in x))
    return np.array([xi / max(norm, _L2_EPS) for xi in x])


def normalize(x, profile: str = "tacl") -> np.ndarray:
    """Row by row: LayerNorm without affine (tacl) or x / max(||x||, 1e-12) (lucidrains)."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1])
    return np.array([_normalize_row(row, profile) for row in flat]).reshape(x.shape)


def route(similarities, window: int, key_padding_mask=None) -> np.ndarray:
    """members[b, h, c] = the W unpadded positions with the largest S[b, h, :, c], ties to the lower
    position, listed in increasing position, -1 filling the slots left over."""
    s = np.asarray(similarities, dtype=np.float64)
    batch, heads, length, clusters = s.shape
    real = _unpadded(key_padding_mask, batch, length)
    members = np.full((batch, heads, clusters, window), -1, dtype=np.int64)
    for b in range(batch):
        for h in range(heads):
            for c in range(clusters):
                candidates = [t for t in range(length) if real[b, t]]
                ranked = sorted(candidates, key=lambda t: (-s[b, h, t, c], t))
                chosen = sorted(ranked[:window])
                members[b, h, c, : len(chosen)] = chosen
    return members


def _features(q, k, shared_qk: bool, profile: str):
    """(query features, key features, logit scale) of spec/routing.md step 4."""
    q = np.asarray(q, dtype=np.float64)
    keys_raw = q if shared_qk else np.asarray(k, dtype=np.float64)
    if profile == "tacl":
        fq = normalize(q, "tacl")
        return fq, (fq if shared_qk else normalize(keys_raw, "tacl")), 1.0
    return q, (normalize(q, "lucidrains") if shared_qk else keys_raw), 1.0 / math.sqrt(q.shape[3])


def cluster_attention(q, k, v, q_members, k_members, *, causal=False, shared_qk=False, profile="tacl") -> np.ndarray:
    """o[b, h, c, w]: the query t in slot w of cluster c attending, by a softmax over a Python list, to
    the keys j of cluster c (j <= t when causal; lucidrains shared QK: its own logit is -5e4); 0 for an
    empty slot or one with no valid key."""
    v = np.asarray(v, dtype=np.float64)
    fq, fk, scale = _features(q, k, shared_qk, profile)
    qm = np.asarray(q_members)
    km = np.asarray(k_members)
    batch, heads, clusters, window = qm.shape
    out = np.zeros((batch, heads, clusters, window, v.shape[3]))
    for b, h, c, w in np.ndindex(batch, heads, clusters, window):
        t = int(qm[b, h, c, w])
        keys = sorted({int(j) for j in km[b, h, c] if j >= 0 and (not causal or j <= t)})
        if t < 0 or not keys:
            continue
        logits = [_SELF_LOGIT if shared_qk and profile == "lucidrains" and j == t
                  else scale * float(np.dot(fq[b, h, t], fk[b, h, j])) for j in keys]
        peak = max(logits)
        weights = [math.exp(z - peak) for z in logits]
        out[b, h, c, w] = sum(weight * v[b, h, j] for weight, j in zip(weights, keys, strict=True)) / sum(weights)
    return out


def routed_attention(q, k, v, q_members, k_members, *, causal=False, shared_qk=False, profile="tacl") -> np.ndarray:
    """Brute force over co-membership: for every token t and every cluster c whose query list holds
    t, a dense softmax over the keys j of c (j <= t when causal), then the combine rule
    out_t = sum_c o_{c,t} / (count_t + eps). Equals combine(cluster_attention(...)) by definition."""
    v = np.asarray(v, dtype=np.float64)
    batch, heads, length, _ = np.shape(q)
    fq, fk, scale = _features(q, k, shared_qk, profile)
    qm = np.asarray(q_members)
    km = np.asarray(k_members)
    out = np.zeros((batch, heads, length, v.shape[3]))
    for b in range(batch):
        for h in range(heads):
            clusters_of = {t: [] for t in range(length)}
            for c in range(qm.shape[2]):
                for t in qm[b, h, c]:
                    if t >= 0:
                        clusters_of[int(t)].append(c)
            for t in range(length):
                total = np.zeros(v.shape[3])
                for c in clusters_of[t]:
                    keys = sorted({int(j) for j in km[b, h, c] if j >= 0 and (not causal or j <= t)})
                    if not keys:
                        continue  # no valid key: this cluster's output for t is 0
                    logits = []
                    for j in keys:
                        if shared_qk and profile == "lucidrains" and j == t:
                            logits.append(_SELF_LOGIT)
                        else:
                            logits.append(scale * float(np.dot(fq[b, h, t], fk[b, h, j])))
                    peak = max(logits)
                    weights = [math.exp(z - peak) for z in logits]
                    norm = sum(weights)
                    for weight, j in zip(weights, keys, strict=True):
                        total += (weight / norm) * v[b, h, j]
                out[b, h, t] = total / (len(clusters_of[t]) + _COMBINE_EPS[profile])
    return out


def attention(q, k, v, centroids, *, window=None, causal=False, shared_qk=False, profile="tacl",
              key_padding_mask=None) -> np.ndarray:
    """The whole pipeline from the naive pieces: normalize, S = x̂ μᵀ, naive route, brute-force attention."""
    q = np.asarray(q, dtype=np.float64)
    mu = np.asarray(centroids, dtype=np.float64)
    batch, heads, length, _ = q.shape
    if window is None:
        window = -(-length // mu.shape[1])

    def sims(x):
        xh = normalize(x, profile)
        s = np.zeros((batch, heads, length, mu.shape[1]))
        for b in range(batch):
            for h in range(heads):
                for t in range(length):
                    for c in range(mu.shape[1]):
                        s[b, h, t, c] = float(np.dot(xh[b, h, t], mu[h, c]))
        return s

    q_members = route(sims(q), window, key_padding_mask)
    k_members = q_members if shared_qk else route(sims(k), window, key_padding_mask)
    return routed_attention(q, k, v, q_members, k_members, causal=causal, shared_qk=shared_qk, profile=profile)


def local_attention(q, k, v, block: int, *, causal=False, key_padding_mask=None) -> np.ndarray:
    """Dense L x L masked softmax: i sees j iff floor(j/B) - floor(i/B) in {-1, 0} (or {-1, 0, 1}
    when not causal), j <= i when causal, neither padded; logits q·k/sqrt(D); empty rows give 0."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, heads, length, dim = q.shape
    real = _unpadded(key_padding_mask, batch, length)
    out = np.zeros((batch, heads, length, v.shape[3]))
    allowed = {-1, 0} if causal else {-1, 0, 1}
    for b in range(batch):
        for h in range(heads):
            logits = q[b, h] @ k[b, h].T / math.sqrt(dim)
            for i in range(length):
                if not real[b, i]:
                    continue
                seen = [j for j in range(length)
                        if real[b, j] and (j // block - i // block) in allowed and (not causal or j <= i)]
                if not seen:
                    continue
                z = np.array([logits[i, j] for j in seen])
                w = np.exp(z - z.max())
                out[b, h, i] = (w / w.sum()) @ v[b, h, seen]
    return out


def assign(x_hat, centroids, key_padding_mask=None) -> np.ndarray:
    """The centroid with the largest dot product, ties to the lower index; -1 at padding."""
    x = np.asarray(x_hat, dtype=np.float64)
    mu = np.asarray(centroids, dtype=np.float64)
    batch, heads, length, _ = x.shape
    real = _unpadded(key_padding_mask, batch, length)
    labels = np.full((batch, heads, length), -1, dtype=np.int64)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                if real[b, t]:
                    scores = [float(np.dot(x[b, h, t], mu[h, c])) for c in range(mu.shape[1])]
                    labels[b, h, t] = min(range(len(scores)), key=lambda c: (-scores[c], c))
    return labels


def commitment_loss(x_hat, centroids, *, beta=1e-4, key_padding_mask=None) -> float:
    """beta * mean over the unpadded tokens' elements of (x̂ - μ_assign)²."""
    x = np.asarray(x_hat, dtype=np.float64)
    mu = np.asarray(centroids, dtype=np.float64)
    labels = assign(x, mu, key_padding_mask)
    total, count = 0.0, 0
    for b, h, t in np.ndindex(labels.shape):
        if labels[b, h, t] >= 0:
            for d in range(x.shape[3]):
                total += (x[b, h, t, d] - mu[h, labels[b, h, t], d]) ** 2
                count += 1
    return 0.0 if count == 0 else beta * total / count


_LAPLACE_EPS = 1e-5


def update_centroids(means, counts, sums, q_hat, k_hat=None, *, profile="tacl", key_padding_mask=None,
                     decay=0.999) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One k-means step, token by token: returns (means, counts, sums).

    ``tacl``: for x in (q̂, then k̂ if given), per head and cluster, N_c and S_c over the unpadded
    tokens assigned to c under the incoming means, then counts ← λ counts + (1−λ) N,
    sums ← λ sums + (1−λ) S; finally means_c = sums_c / ((counts_c + ε) n / (n + Cε)), n = Σ counts
    (means kept where n = 0). ``lucidrains``: m_c = Σ x̂ over the members of c among q̂ and k̂,
    divided by max(‖Σ‖, 1e-12), m_c = means_c for an empty cluster; means ← λ means + (1−λ) m.
    """
    means = np.asarray(means, dtype=np.float64)
    heads, clusters, dim = means.shape
    inputs = [np.asarray(q_hat, dtype=np.float64)] + ([] if k_hat is None else [np.asarray(k_hat, dtype=np.float64)])
    tallies = []
    for x in inputs:
        labels = assign(x, means, key_padding_mask)
        n = np.zeros((heads, clusters))
        s = np.zeros((heads, clusters, dim))
        for b, h, t in np.ndindex(labels.shape):
            if labels[b, h, t] >= 0:
                n[h, labels[b, h, t]] += 1
                s[h, labels[b, h, t]] += x[b, h, t]
        tallies.append((n, s))
    if profile == "tacl":
        counts = np.array(counts, dtype=np.float64)
        sums = np.array(sums, dtype=np.float64)
        for n, s in tallies:
            counts = decay * counts + (1 - decay) * n
            sums = decay * sums + (1 - decay) * s
        new = means.copy()
        for h in range(heads):
            total = sum(counts[h])
            if total > 0:
                for c in range(clusters):
                    new[h, c] = sums[h, c] / ((counts[h, c] + _LAPLACE_EPS) * total / (total + clusters * _LAPLACE_EPS))
        return new, counts, sums
    new = means.copy()
    for h in range(heads):
        for c in range(clusters):
            members = sum(n[h, c] for n, _ in tallies)
            total = sum(s[h, c] for _, s in tallies)
            batch_mean = total / max(math.sqrt(sum(v * v for v in total)), _L2_EPS) if members else means[h, c]
            new[h, c] = decay * means[h, c] + (1 - decay) * batch_mean
    return new, np.array(counts, dtype=np.float64), np.array(sums, dtype=np.float64)
