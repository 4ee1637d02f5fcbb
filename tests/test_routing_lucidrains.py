"""The lucidrains profile equals lucidrains/routing-transformer 1.6.1's KmeansAttention.

Set up as spec/routing.md describes: eval mode (no dropout, no centroid update), fixed centroids
copied into ``kmeans.means`` with ``kmeans.initted`` set (so the data-dependent init never runs),
float64, no padding. Compared in the configurations that package runs without learned memory
key/values: non-causal with shared or unshared QK, causal with shared QK; window W <= L.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: lucidrains parity not checked")
rt = pytest.importorskip("routing_transformer", reason="routing_transformer 1.6.1 is not installed (extra 'peer')")

from refattn import routing  # noqa: E402

TOL = 1e-10
CASES = [  # (causal, shared_qk, B, H, L, D, C, W)
    (False, False, 2, 3, 16, 8, 4, 4),
    (False, False, 1, 2, 13, 5, 3, 6),
    (False, False, 2, 1, 20, 7, 5, 3),  # C W < L: some tokens in no cluster
    (False, True, 2, 3, 16, 8, 4, 4),
    (False, True, 1, 2, 11, 3, 4, 5),
    (True, True, 2, 3, 16, 8, 4, 4),
    (True, True, 2, 2, 17, 6, 3, 8),
    (True, True, 1, 1, 1, 4, 2, 1),  # L = 1
]


def module(causal, shared, heads, dim, centroids, window):
    attn = rt.KmeansAttention(centroids.shape[1], window, heads, dim, causal=causal, shared_qk=shared, dropout=0.0)
    attn = attn.double().eval()
    assert attn.num_mem_kv == 0
    with torch.no_grad():
        attn.kmeans.means.copy_(torch.from_numpy(centroids))
        attn.kmeans.initted.fill_(True)
    return attn


def inputs(seed, batch, heads, length, dim, clusters):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((3, batch, heads, length, dim))
    centroids = rng.standard_normal((heads, clusters, dim))
    centroids /= np.linalg.norm(centroids, axis=-1, keepdims=True)
    return q, k, v, centroids


@pytest.mark.parametrize("causal,shared,batch,heads,length,dim,clusters,window", CASES)
def test_attention_equals_kmeans_attention(causal, shared, batch, heads, length, dim, clusters, window):
    q, k, v, centroids = inputs(length * 13 + dim, batch, heads, length, dim, clusters)
    attn = module(causal, shared, heads, dim, centroids, window)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, q if shared else k, v))
    with torch.no_grad():
        expected, aux = attn(tq, tk, tv)
    out = routing.attention(q, None if shared else k, v, centroids, window=window, causal=causal,
                            shared_qk=shared, profile="lucidrains")
    np.testing.assert_allclose(out, expected.numpy(), rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(attn.kmeans.means.numpy(), centroids)  # eval mode changed nothing

    # aux loss: lucidrains averages over cat(q̂, k̂) along the sequence (q̂ alone when shared)
    x_hat = routing.normalize(q if shared else np.concatenate([q, k], axis=2), profile="lucidrains")
    assert routing.commitment_loss(x_hat, centroids) == pytest.approx(float(aux), rel=TOL, abs=1e-300)


@pytest.mark.parametrize("causal,shared", [(False, False), (False, True), (True, True)])
def test_attention_vjp_equals_torch_autograd(causal, shared):
    batch, heads, length, dim, clusters, window = 2, 2, 12, 5, 3, 5
    q, k, v, centroids = inputs(99, batch, heads, length, dim, clusters)
    attn = module(causal, shared, heads, dim, centroids, window)
    tq, tk, tv = (torch.from_numpy(x.copy()).requires_grad_() for x in (q, k, v))
    out, _ = attn(tq, tq if shared else tk, tv)
    dout = np.random.default_rng(7).standard_normal(out.shape)
    out.backward(torch.from_numpy(dout))
    dq, dk, dv = routing.attention_vjp(q, None if shared else k, v, centroids, dout, window=window, causal=causal,
                                       shared_qk=shared, profile="lucidrains")
    np.testing.assert_allclose(dq, tq.grad.numpy(), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(dv, tv.grad.numpy(), rtol=TOL, atol=TOL)
    if shared:
        assert dk is None
    else:
        np.testing.assert_allclose(dk, tk.grad.numpy(), rtol=TOL, atol=TOL)


def test_update_equals_kmeans_iter_and_ema():
    # kmeans_iter on x̂ = normalize(cat(q, k)) with the current means, then means <- λ means + (1 - λ) m
    heads, dim, clusters = 2, 4, 6
    q, k, _, centroids = inputs(5, 3, heads, 10, dim, clusters)
    x_hat = torch.nn.functional.normalize(torch.from_numpy(np.concatenate([q, k], axis=2)), dim=-1)
    kmeans = rt.routing_transformer.Kmeans(heads, dim, clusters, ema_decay=0.9).double()
    with torch.no_grad():
        kmeans.means.copy_(torch.from_numpy(centroids))
        kmeans.initted.fill_(True)
        batch_means = rt.routing_transformer.kmeans_iter(x_hat, kmeans.means)
        kmeans.update(batch_means)
    state = routing.CentroidState(centroids, np.zeros((heads, clusters)), np.zeros((heads, clusters, dim)))
    new = routing.update_centroids(state, routing.normalize(q, profile="lucidrains"),
                                   routing.normalize(k, profile="lucidrains"), profile="lucidrains", decay=0.9)
    np.testing.assert_allclose(new.means, kmeans.means.numpy(), rtol=TOL, atol=TOL)


def test_self_logit_matches_lucidrains_when_it_competes():
    # D = 2 (KmeansAttention needs Dv = D). Token 0's logit on token 1 is q0 · (q1 / |q1|) / sqrt(2)
    # = -50001, next to its self logit -5e4: the weights are 1 : e^-1.
    a = 50001.0 * np.sqrt(2.0)
    q = np.array([[[[a, 0.0], [-1.0, 0.0]]]])
    v = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    centroids = np.array([[[1.0, 0.0]]])
    attn = module(False, True, 1, 2, centroids, 2)
    with torch.no_grad():
        expected, _ = attn(torch.from_numpy(q), torch.from_numpy(q), torch.from_numpy(v))
    out = routing.attention(q, None, v, centroids, window=2, shared_qk=True, profile="lucidrains")
    np.testing.assert_allclose(out, expected.numpy(), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(out[0, 0, 0], np.array([1.0, np.exp(-1.0)]) / (1 + np.exp(-1.0)) / (1 + 1e-5), rtol=1e-9)
