"""``RoutingAttention`` (backends/torch/layers/routing_attention.py): composition, head order, centroid updates,
commitment loss, padding, state_dict, bad arguments, and centroid convergence on clustered data."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch backend needs torch (pip install 'refattn[torch]')")

import torch

from refattn import routing as ref
from refattn.backends.torch import RoutingAttention
from refattn.backends.torch import routing as F


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: one intra-op thread avoids oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer(**kw):
    torch.manual_seed(0)
    args = dict(dim=12, heads=3, num_clusters=3, window=4)
    args.update(kw)
    return RoutingAttention(**args).double()


def N(t):
    return t.detach().cpu().double().numpy()


def split(m: RoutingAttention, x: torch.Tensor, width: int) -> np.ndarray:
    """(B, L, count * D) -> (B, count, L, D) as NumPy."""
    b, length, _ = x.shape
    return N(x.reshape(b, length, -1, m.dim_head).transpose(1, 2))


def manual(m: RoutingAttention, x: torch.Tensor, mask: np.ndarray | None) -> np.ndarray:
    """The layer's output composed by hand from its weights and the NumPy reference."""
    q = split(m, m.to_q(x), m.heads)
    v = split(m, m.to_v(x), m.heads)
    k = None if m.to_k is None else split(m, m.to_k(x), -1)
    loc, rout = m.local_heads, m.routing_heads
    local_first = m.profile == "lucidrains"
    r = slice(loc, None) if local_first else slice(0, rout)
    lo = slice(0, loc) if local_first else slice(rout, None)
    length = x.shape[1]
    window = min(m.window or ref.default_window(length, m.num_clusters), length)
    routed = ref.attention(q[:, r], None if m.shared_qk else k[:, loc:], v[:, r], N(m.means), window=window,
                           causal=m.causal, shared_qk=m.shared_qk, profile=m.profile, key_padding_mask=mask)
    parts = [routed]
    if loc:
        local = ref.local_attention(q[:, lo], k[:, :loc], v[:, lo], min(m.local_block, length), causal=m.causal,
                                    key_padding_mask=mask)
        parts = [local, routed] if local_first else [routed, local]
    heads = np.concatenate(parts, axis=1)  # (B, H, L, D)
    merged = heads.transpose(0, 2, 1, 3).reshape(x.shape[0], length, -1)
    return merged @ N(m.to_out.weight).T


CONFIGS = [  # profile, causal, shared_qk, local_heads
    ("tacl", False, False, 0),
    ("tacl", True, False, 1),
    ("tacl", True, True, 2),
    ("lucidrains", False, False, 1),
    ("lucidrains", True, True, 1),
    ("lucidrains", False, True, 0),
]


@pytest.mark.parametrize("profile,causal,shared,local", CONFIGS)
@pytest.mark.parametrize("padded", [False, True])
def test_eval_forward_is_the_reference_composition(profile, causal, shared, local, padded):
    m = layer(profile=profile, causal=causal, shared_qk=shared, local_heads=local, local_block=3).eval()
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    mask = None
    if padded:
        mask = np.zeros((2, 11), bool)
        mask[0, 8:] = True
        mask[1, [2, 5]] = True
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = m(x, None if mask is None else torch.from_numpy(mask))
    assert y.shape == x.shape and y.dtype == torch.float64
    np.testing.assert_allclose(N(y), manual(m, x, mask), rtol=1e-10, atol=1e-12)
    for name, value in m.state_dict().items():  # eval mode: nothing updated
        assert torch.equal(value, before[name]), name
    if padded:
        assert float(y.detach()[torch.from_numpy(mask)].abs().max()) == 0.0  # no bias: padded rows are 0


def test_head_order_per_profile():
    """tacl: routing heads in the first head slots, local heads after; lucidrains: local heads first.

    With the output projection's columns of the routing slots zeroed, the layer outputs the local
    heads alone, which must be local attention of the expected slot's q and v (keys: the first
    key-projection slot, which always belongs to the local heads).
    """
    for profile, local_slot in (("tacl", 2), ("lucidrains", 0)):
        m = layer(profile=profile, local_heads=1, shared_qk=True, local_block=3).eval()
        x = torch.randn(2, 9, 12, dtype=torch.float64)
        with torch.no_grad():
            keep = torch.zeros(12, dtype=torch.bool)
            keep[4 * local_slot:4 * local_slot + 4] = True
            m.to_out.weight[:, ~keep] = 0.0
            y = m(x)
            q = m.to_q(x).reshape(2, 9, 3, 4).transpose(1, 2)[:, local_slot:local_slot + 1]
            v = m.to_v(x).reshape(2, 9, 3, 4).transpose(1, 2)[:, local_slot:local_slot + 1]
            k = m.to_k(x).reshape(2, 9, 1, 4).transpose(1, 2)
            local = F.local_attention(q, k, v, 3)
            want = local.transpose(1, 2).reshape(2, 9, 4) @ m.to_out.weight[:, keep].T
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        assert m.to_k.out_features == 4  # shared QK: keys only for the local head


@pytest.mark.parametrize("profile,causal,shared,local", CONFIGS)
def test_training_forward_updates_centroids_functionally(profile, causal, shared, local):
    m = layer(profile=profile, causal=causal, shared_qk=shared, local_heads=local, decay=0.9).train()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 7:] = True
    state = F.CentroidState(*(t.clone() for t in m.centroid_state))
    q = m.to_q(x).reshape(2, 10, 3, 4).transpose(1, 2)
    r = slice(local, None) if profile == "lucidrains" else slice(0, m.routing_heads)
    q_hat = F.normalize(q[:, r], profile=profile)
    k_hat = None
    if not shared:
        k = m.to_k(x).reshape(2, 10, -1, 4).transpose(1, 2)[:, local:]
        k_hat = F.normalize(k, profile=profile)
    want = F.update_centroids(state, q_hat.detach(), None if k_hat is None else k_hat.detach(), profile=profile,
                              key_padding_mask=mask, decay=0.9)
    # the reference agrees on the same statistics
    want_ref = ref.update_centroids(ref.CentroidState(*(N(t) for t in state)), N(q_hat),
                                    None if k_hat is None else N(k_hat), profile=profile,
                                    key_padding_mask=mask.numpy(), decay=0.9)
    y = m(x, mask)
    for got, expected, expected_ref in zip(m.centroid_state, want, want_ref, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(N(got), expected_ref, rtol=1e-10, atol=1e-12)
    assert not torch.equal(m.means, state.means)
    # the loss of the forward (computed under the incoming centroids) backpropagates after the update
    (y.square().mean() + m.commitment_loss).backward()
    assert m.to_q.weight.grad is not None and float(m.to_q.weight.grad.abs().sum()) > 0


def test_no_update_in_eval_and_update_under_no_grad_in_training():
    m = layer().eval()
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    means = m.means.clone()
    m(x)
    assert torch.equal(m.means, means)
    m.train()
    with torch.no_grad():
        m(x)
    assert not torch.equal(m.means, means)


@pytest.mark.parametrize("profile,shared",
                         [("tacl", False), ("tacl", True), ("lucidrains", False), ("lucidrains", True)])
def test_commitment_loss_per_profile(profile, shared):
    m = layer(profile=profile, shared_qk=shared, local_heads=1).eval()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    y, loss = m(x, mask, return_loss=True)
    assert loss is m.commitment_loss and loss.dim() == 0 and loss.requires_grad
    q = N(m.to_q(x).reshape(2, 9, 3, 4).transpose(1, 2))
    r = slice(1, None) if profile == "lucidrains" else slice(0, 2)
    q_hat = ref.normalize(q[:, r], profile=profile)
    mu, mk = N(m.means), mask.numpy()
    if shared:
        k_hat = q_hat
    else:
        k_hat = ref.normalize(N(m.to_k(x).reshape(2, 9, 3, 4).transpose(1, 2))[:, 1:], profile=profile)
    if profile == "tacl":  # TF: q loss + k loss (the q loss twice with shared QK)
        want = ref.commitment_loss(q_hat, mu, key_padding_mask=mk) + ref.commitment_loss(k_hat, mu, key_padding_mask=mk)
    elif shared:  # lucidrains: one loss over q̂ (shared) or cat(q̂, k̂)
        want = ref.commitment_loss(q_hat, mu, key_padding_mask=mk)
    else:
        want = ref.commitment_loss(np.concatenate([q_hat, k_hat], axis=2), mu,
                                   key_padding_mask=np.concatenate([mk, mk], axis=1))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-10)
    (grad,) = torch.autograd.grad(loss, m.to_q.weight)
    assert float(grad.abs().sum()) > 0


def test_padding_does_not_leak():
    m = layer(causal=True, local_heads=1, local_block=2).train()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 6:] = True
    mask[1, 3] = True
    state = {k: v.clone() for k, v in m.state_dict().items()}
    y1 = m(x, mask)
    after1 = [t.clone() for t in m.centroid_state]
    m.load_state_dict(state)
    x2 = x.clone()
    x2[mask] = 100.0 * torch.randn(int(mask.sum()), 12, dtype=torch.float64)
    y2 = m(x2, mask)
    torch.testing.assert_close(y1[~mask], y2[~mask], rtol=1e-12, atol=1e-12)
    for a, b in zip(after1, m.centroid_state, strict=True):  # padded tokens are not in the centroid statistics
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_and_buffers():
    m = layer(local_heads=1).train()
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    m(x)
    keys = set(m.state_dict())
    assert {"means", "counts", "sums"} <= keys
    assert m.means.shape == (2, 3, 4) and m.counts.shape == (2, 3) and m.sums.shape == (2, 3, 4)
    other = layer(local_heads=1)
    torch.manual_seed(1)
    other = RoutingAttention(dim=12, heads=3, num_clusters=3, window=4, local_heads=1).double()
    other.load_state_dict(m.state_dict())
    m.eval(), other.eval()
    torch.testing.assert_close(m(x), other(x), rtol=0, atol=0)
    assert other.means.dtype == torch.float64  # .double() converted the buffers
    assert "routing 2, local 1" in repr(m)


def test_construction_defaults_and_reproducibility():
    m = RoutingAttention(dim=16, heads=2, max_seq_len=50)
    assert m.num_clusters == 7 and m.window is None and m.profile == "tacl" and m.means.dtype == torch.float32
    torch.manual_seed(3)
    a = RoutingAttention(dim=16, heads=2, num_clusters=4)
    torch.manual_seed(3)
    b = RoutingAttention(dim=16, heads=2, num_clusters=4)
    assert torch.equal(a.means, b.means)
    g = torch.Generator().manual_seed(9)
    c = RoutingAttention(dim=16, heads=2, num_clusters=4, generator=g)
    want = F.init_centroids(2, 4, 8, rng=torch.Generator().manual_seed(9))
    assert torch.equal(c.means, want.means)
    # window larger than the input is clamped to L; default window ceil(L / C)
    m = RoutingAttention(dim=8, heads=1, num_clusters=2, window=64).double().eval()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    np.testing.assert_allclose(N(m(x)), manual(m, x, None), rtol=1e-10, atol=1e-12)
    m.window = None
    np.testing.assert_allclose(N(m(x)), manual(m, x, None), rtol=1e-10, atol=1e-12)


def test_load_centroid_state():
    m = layer()
    state = F.init_centroids(3, 3, 4, rng=np.random.default_rng(0), dtype=torch.float64)
    m.load_centroid_state(state)
    assert all(torch.equal(a, b) for a, b in zip(m.centroid_state, state, strict=True))
    with pytest.raises(ValueError, match="state: expected shapes"):
        m.load_centroid_state(F.init_centroids(3, 2, 4, rng=np.random.default_rng(0), dtype=torch.float64))


def test_reduced_precision_forward_backward():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch.manual_seed(0)
        m = RoutingAttention(dim=16, heads=4, num_clusters=3, local_heads=2, local_block=4, causal=True,
                             shared_qk=True).to(dtype).train()
        x = torch.randn(2, 13, 16, dtype=dtype, requires_grad=True)
        y = m(x)
        assert y.dtype == dtype and m.means.dtype == torch.float32  # the centroid state stays in float32
        assert m.counts.dtype == m.sums.dtype == torch.float32 and "means" in m.state_dict()
        (y.float().square().mean() + m.commitment_loss).backward()
        assert torch.isfinite(x.grad.float()).all() and torch.isfinite(m.means.float()).all()
        assert float(m.counts.sum()) > 0  # the update ran (and did not stall in half precision)


def test_autocast_bfloat16():
    """A float32 layer under CPU autocast: bfloat16 projections, float32 centroid state and loss."""
    torch.manual_seed(0)
    m = RoutingAttention(dim=16, heads=4, num_clusters=3, local_heads=1, local_block=4).train()
    x = torch.randn(2, 13, 16)
    means = m.means.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and m.commitment_loss.dtype == torch.float32
    (y.float().square().mean() + m.commitment_loss).backward()
    assert m.means.dtype == torch.float32 and not torch.equal(m.means, means)
    assert torch.isfinite(m.to_q.weight.grad).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(local_heads=3), ValueError, r"^local_heads: expected an integer in \[0, 2\], got 3$"),
    (dict(local_heads=-1), ValueError, r"^local_heads: expected an integer in \[0, 2\], got -1$"),
    (dict(num_clusters=None), ValueError, r"^num_clusters: expected an integer >= 1, or max_seq_len to derive it"),
    (dict(dim=10), ValueError, r"^dim, heads: expected dim divisible by heads \(or give dim_head\)"),
    (dict(causal=True, profile="lucidrains"), ValueError, r"^profile: 'lucidrains' does not support"),
    (dict(profile="other"), ValueError, r"^profile: expected one of"),
    (dict(num_clusters=0), ValueError, r"^num_clusters: expected an integer .*, got 0$"),
    (dict(window=0), ValueError, r"^window: expected an integer .*, got 0$"),
    (dict(local_block=0), ValueError, r"^local_block: expected an integer .*, got 0$"),
    (dict(decay=1.5), ValueError, r"^decay: expected a number in \[0, 1\], got 1.5$"),
    (dict(commitment=-1.0), ValueError, r"^commitment: expected a number >= 0, got -1.0$"),
    (dict(dim=12.0), TypeError, r"^dim: expected an integer, got float 12.0$"),
    (dict(dim="12"), TypeError, r"^dim: expected an integer, got str '12'$"),
    (dict(heads=3.0), TypeError, r"^heads: expected an integer, got float 3.0$"),
    (dict(num_clusters=2.0), TypeError, r"^num_clusters: expected an integer, got float 2.0$"),
    (dict(window="4"), TypeError, r"^window: expected an integer, got str '4'$"),
    (dict(local_heads=True), TypeError, r"^local_heads: expected an integer, got bool True$"),
    (dict(local_block=4.0), TypeError, r"^local_block: expected an integer, got float 4.0$"),
    (dict(num_clusters=None, max_seq_len=64.0), TypeError, r"^max_seq_len: expected an integer, got float 64.0$"),
    (dict(dim_head=4.0), TypeError, r"^dim_head: expected an integer, got float 4.0$"),
    (dict(dim_head=0), ValueError, r"^dim_head: expected an integer .*, got 0$"),
    (dict(causal=1), TypeError, r"^causal: expected a bool \(True or False\), got int 1$"),
    (dict(shared_qk="no"), TypeError, r"^shared_qk: expected a bool \(True or False\), got str 'no'$"),
    (dict(decay="0.9"), TypeError, r"^decay: expected a real number, got str '0.9'$"),
    (dict(commitment=None), TypeError, r"^commitment: expected a real number, got NoneType None$"),
    (dict(bias=0), TypeError, r"^bias: expected a bool \(True or False\), got int 0$"),
    (dict(generator=1), TypeError, r"^generator: expected a torch.Generator or None, got int$"),
    (dict(sync_centroids="yes"), TypeError, r"^sync_centroids: expected a bool \(True or False\), got str 'yes'$"),
])
def test_rejects_bad_arguments(kwargs, error, match):
    """Every option, checked where it is given: a wrong type is a TypeError, a wrong value a ValueError,
    each naming the option (before, dim=12.0 failed inside torch)."""
    args = dict(dim=12, heads=3, num_clusters=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        RoutingAttention(**args)


def test_accepts_numpy_integers():
    """NumPy integers are integers (before: 'num_clusters: expected an integer >= 1, got np.int64(2)')."""
    m = RoutingAttention(dim=np.int64(12), heads=np.int32(3), num_clusters=np.int64(2), window=np.int64(3),
                         local_heads=np.int64(1), local_block=np.uint16(4), decay=np.float32(0.5))
    assert (m.dim, m.heads, m.num_clusters, m.window, m.local_heads, m.local_block) == (12, 3, 2, 3, 1, 4)
    assert all(type(n) is int for n in (m.dim, m.heads, m.num_clusters, m.window, m.local_heads, m.local_block))
    assert m(torch.randn(1, 7, 12)).shape == (1, 7, 12)
    derived = RoutingAttention(dim=12, heads=3, max_seq_len=np.int64(64))
    assert derived.num_clusters == 8 and type(derived.max_seq_len) is int


def test_rejects_bad_input():
    m = layer()
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, L, dim\) = \('\*', '\*', 12\), got \(2, 5, 11\)$"):
        m(torch.randn(2, 5, 11, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got list$"):
        m([[0.0] * 12])
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        m(torch.randn(2, 5, 12, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^return_loss: expected a bool"):
        m(torch.randn(2, 5, 12, dtype=torch.float64), return_loss="yes")


def test_rejects_an_input_of_another_dtype():
    """A float64 x given to a float32 layer: a TypeError naming x and both dtypes, not nn.Linear's
    'mat1 and mat2 must have the same dtype'."""
    m = RoutingAttention(dim=12, heads=3, num_clusters=2)
    with pytest.raises(TypeError, match=r"^x: expected a tensor of the layer's dtype torch.float32, got torch.float64"):
        m(torch.randn(2, 5, 12, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^x: expected a tensor of the layer's dtype torch.float64, got torch.float32"):
        layer()(torch.randn(2, 5, 12))


# ------------------------------------------------------------------------------ convergence


@pytest.mark.parametrize("profile", ["tacl", "lucidrains"])
def test_centroids_converge_to_cluster_directions(profile):
    """Tokens drawn around K well-separated (orthogonal) directions: after some training forwards the
    centroids in use sit on those directions, and every direction has a centroid.

    The layer's query projection is the identity, so the routed queries are the data. The layer has
    2K centroids: online k-means from a random start can leave one true cluster to two centroids
    with K of them, which is the algorithm's behaviour, not a bug.
    """
    dim, k_true, clusters = 16, 4, 8
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = RoutingAttention(dim, 1, num_clusters=clusters, window=8, profile=profile, shared_qk=True,
                             decay=0.9).double().train()
        with torch.no_grad():
            m.to_q.weight.copy_(torch.eye(dim))
        g = torch.Generator().manual_seed(100 + seed)
        basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
        directions = 4.0 * basis[:, :k_true].T  # (K, D), orthogonal, norm 4
        initial = m.means.clone()
        for _ in range(80):
            labels = torch.randint(0, k_true, (4, 32), generator=g)
            x = directions[labels] + 0.3 * torch.randn(4, 32, dim, generator=g, dtype=torch.float64)
            m(x)
        unit = torch.nn.functional.normalize
        target = unit(F.normalize(directions, profile=profile), dim=-1)
        cosine = target @ unit(m.means[0], dim=-1).T  # (K, C)
        in_use = torch.unique(F.assign(F.normalize(x[:, None], profile=profile), m.means))
        assert float(cosine.max(dim=1).values.min()) > 0.99, cosine  # every direction has a centroid
        assert float(cosine[:, in_use].max(dim=0).values.min()) > 0.98, cosine  # every used centroid is on one
        assert float((target @ unit(initial[0], dim=-1).T).max(dim=1).values.min()) < 0.9  # it was not at the start


# ------------------------------------------------------------------------------ CUDA


def test_module_on_cuda():
    if not torch.cuda.is_available():
        print("skipping: torch.cuda.is_available() is False (no CUDA device on this machine)")
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    for profile, causal, shared, local in CONFIGS:
        cpu = layer(profile=profile, causal=causal, shared_qk=shared, local_heads=local, decay=0.9).train()
        gpu = layer(profile=profile, causal=causal, shared_qk=shared, local_heads=local, decay=0.9).cuda().train()
        x = torch.randn(2, 37, 12, dtype=torch.float64)
        mask = torch.zeros(2, 37, dtype=torch.bool)
        mask[1, 30:] = True
        y_cpu, y_gpu = cpu(x, mask), gpu(x.cuda(), mask.cuda())
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-9, atol=1e-11)
        (y_gpu.square().mean() + gpu.commitment_loss).backward()
        for a, b in zip(gpu.centroid_state, cpu.centroid_state, strict=True):
            assert a.device.type == "cuda"
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-11)
