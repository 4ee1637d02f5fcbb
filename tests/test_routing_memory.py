"""Routing attention at L = 65,536 with the default C and W: peak Python allocation under 1 GiB,
hence no L x L array anywhere."""

import time
import tracemalloc

import numpy as np
import pytest

from refattn import routing

LENGTH, DIM = 65_536, 64
GIB = 2**30


@pytest.mark.slow
@pytest.mark.parametrize("profile,shared", [("tacl", False), ("lucidrains", True)])
def test_attention_peak_memory_at_64k_tokens(profile, shared):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, 1, LENGTH, DIM))
    clusters = routing.default_num_clusters(LENGTH)
    assert clusters == 256 and routing.default_window(LENGTH, clusters) == 256
    centroids = routing.init_centroids(1, clusters, DIM, rng=rng, profile=profile).means
    tracemalloc.start()
    try:
        start = time.perf_counter()
        out = routing.attention(q, None if shared else k, v, centroids, shared_qk=shared, profile=profile)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"routing.attention {profile} shared_qk={shared} L={LENGTH} D={DIM} C=W=256: "
          f"{seconds:.2f} s, tracemalloc peak {peak / 2**20:.0f} MiB")
    assert out.shape == (1, 1, LENGTH, DIM) and np.all(np.isfinite(out))
    assert peak < GIB  # a single L x L float64 array would be 32 GiB
    # Spot-check: a covered token's output is the mean of its clusters' softmax averages.
    q_hat = routing.normalize(q, profile=profile)
    members = routing.route(routing.similarity(q_hat, centroids), 256)[0, 0]
    k_members = members if shared else routing.route(
        routing.similarity(routing.normalize(k, profile=profile), centroids), 256)[0, 0]
    for t in (int(members[0, 0]), int(members[17, 100]), int(members[255, 255])):
        holders = np.flatnonzero((members == t).any(axis=1))
        total = np.zeros(DIM)
        for c in holders:
            keys = k_members[c]
            if profile == "tacl":
                kk = routing.normalize(k[0, 0, keys])
                logits = q_hat[0, 0, t] @ kk.T
            else:
                logits = q[0, 0, t] @ routing.normalize(q[0, 0, keys], profile="lucidrains").T / np.sqrt(DIM)
                logits[keys == t] = -5e4
            w = np.exp(logits - logits.max())
            total += w @ v[0, 0, keys] / w.sum()
        eps = 1e-2 if profile == "tacl" else 1e-5
        np.testing.assert_allclose(out[0, 0, t], total / (holders.size + eps), rtol=1e-10, atol=1e-12)
