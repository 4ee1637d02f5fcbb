"""The benchmark's model and attentions (refattn/quality/model.py, attentions.py, analysis.py): parameter
parity, the attentions against naive masked-softmax oracles, padding, seeding, and the analysis helpers."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refattn import fsat as ref  # noqa: E402
from refattn.quality import analysis  # noqa: E402
from refattn.quality.attentions import DenseAttention, LocalAttention, make_attention  # noqa: E402
from refattn.quality.config import ATTENTIONS, AttentionConfig, ModelConfig  # noqa: E402
from refattn.quality.model import Transformer, parameter_counts, sinusoidal_positions  # noqa: E402
from refattn.quality.tasks import make_task  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def has_peer() -> bool:
    try:
        import routing_transformer  # noqa: F401
    except ImportError:
        return False
    return True


def attentions() -> list[str]:
    if has_peer():
        return list(ATTENTIONS)
    print("routing_transformer is not installed: the 'lucidrains' attention is not checked here")
    return [a for a in ATTENTIONS if a != "lucidrains"]


def projections(dim: int, out: int) -> int:
    return dim * out + out  # a Linear with bias


@pytest.mark.parametrize("task_name", ["copy", "listops", "recall", "planted"])
def test_parameter_parity(task_name):
    """Everything but the attention is identical; the attention's own count is its projections (plus
    FSAT's estimator), by hand: dim 64, 4 heads of 16, 2 layers."""
    task = make_task(task_name, 64)
    counts = {name: parameter_counts(Transformer(task, name)) for name in attentions()}
    rest = {c["rest"] for c in counts.values()}
    assert len(rest) == 1, counts
    dim, layers = 64, 2
    qkvo = projections(dim, 3 * dim) + projections(dim, dim)
    assert counts["dense"]["attention"] == layers * qkvo == 33_280
    assert counts["local"]["attention"] == layers * qkvo
    # FSAT: w (H x Dc) and the cross projection to 2 x H x Dc, Dc = the head width (the layer's default)
    assert counts["fsat"]["attention"] == layers * (qkvo + 4 * 16 + projections(dim, 2 * 4 * 16)) == 50_048
    # ours: separate q, k, v, out projections; with shared QK (causal tasks) keys only for the 2 local heads
    keys = projections(dim, 32) if task.causal else projections(dim, dim)
    assert counts["routing"]["attention"] == layers * (3 * projections(dim, dim) + keys)
    if "lucidrains" in counts:  # no learned memory key/values: causal tasks share QK
        assert counts["lucidrains"]["attention"] == layers * qkvo
    embedding = task.vocab_size * dim
    norms = (2 * layers + 1) * 2 * dim
    mlp = layers * (projections(dim, 4 * dim) + projections(4 * dim, dim))
    head = projections(dim, max(1, task.num_targets) * task.num_classes)
    assert rest == {embedding + norms + mlp + head}
    for name, c in counts.items():
        print(f"{task_name:<8} {name:<10} attention {c['attention']:>6,}  rest {c['rest']:>6,}")


def naive_attention(q, k, v, allowed):
    """Softmax over the allowed keys, (B, H, L, D) -> (B, H, L, D); rows without a key give 0."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_dense_attention_against_naive(causal):
    torch.manual_seed(0)
    layer = DenseAttention(8, 2, causal).double()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    q, k, v = layer.split(x)
    allowed = ~padding[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(7, 7, dtype=torch.bool).tril()
    expected = layer.merge(naive_attention(q, k, v, allowed))
    torch.testing.assert_close(layer(x, padding)[~padding], expected[~padding], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_against_naive(causal):
    """Query i sees key j when j's block (of 3) is i's or the previous one (or the next one when not
    causal), j <= i when causal."""
    torch.manual_seed(1)
    layer = LocalAttention(8, 2, causal, block=3).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    q, k, v = layer.split(x)
    i = torch.arange(10)[:, None] // 3
    j = torch.arange(10)[None, :] // 3
    allowed = (j == i) | (j == i - 1) | ((j == i + 1) & (not causal))
    if causal:
        allowed = allowed & torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(layer(x, None), layer.merge(naive_attention(q, k, v, allowed)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dense", "fsat", "routing", "local"])
def test_padding_does_not_change_a_listops_prediction(name):
    """The tokens stored at padded positions do not matter (masking, and the mean over unpadded positions)."""
    task = make_task("listops", 64)
    model = Transformer(task, name, seed=3).double().eval()
    batch = task.sample(2, np.random.default_rng(0))
    tokens, padding = torch.from_numpy(batch.tokens), torch.from_numpy(batch.padding)
    other = tokens.clone()
    other[padding] = 7
    a, _ = model(tokens, padding)
    b, _ = model(other, padding)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_peer_padding_is_reported_not_assumed():
    """lucidrains' k-means routes padded tokens too (its top-w per centroid ignores the mask), so padded
    values can change what unpadded tokens attend to: measured here, not asserted away."""
    if not has_peer():
        print("skipping: routing_transformer is not installed")
        pytest.skip("routing_transformer is not installed (extra 'peer')")
    task = make_task("listops", 64)
    model = Transformer(task, "lucidrains", seed=3).double().eval()
    batch = task.sample(2, np.random.default_rng(0))
    tokens, padding = torch.from_numpy(batch.tokens), torch.from_numpy(batch.padding)
    other = tokens.clone()
    other[padding] = 7
    a, _ = model(tokens, padding)
    b, _ = model(other, padding)
    change = float((a - b).detach().abs().max())
    print(f"lucidrains: max |change| of the logits when padded tokens change: {change:.3g}")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_seeded_construction_leaves_the_global_rng_alone():
    task = make_task("copy", 32)
    state = torch.get_rng_state()
    first = Transformer(task, "fsat", seed=5)
    second = Transformer(task, "fsat", seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), (_, p2) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(p, p2), name
    third = Transformer(task, "fsat", seed=6)
    assert not torch.equal(first.embed.weight, third.embed.weight)
    layers = first.attention_layers
    assert not torch.equal(layers[0].generator.get_state(), layers[1].generator.get_state())


def test_forward_shapes_and_aux_loss():
    for name in attentions():
        for task_name, expected in (("copy", (2, 32, 3, 16)), ("listops", (2, 10)), ("recall", (2, 32, 1, 16))):
            task = make_task(task_name, 32)
            model = Transformer(task, name, ModelConfig(dim=16, heads=2, depth=1), AttentionConfig(local_block=8))
            batch = task.sample(2, np.random.default_rng(0))
            padding = None if batch.padding is None else torch.from_numpy(batch.padding)
            logits, aux = model(torch.from_numpy(batch.tokens), padding)
            assert tuple(logits.shape) == expected, (name, task_name)
            assert aux.dim() == 0 and (float(aux.detach()) > 0) == (name in ("routing", "lucidrains"))


def test_sinusoidal_positions_by_hand():
    table = sinusoidal_positions(3, 4)
    w = [1.0, 10000.0 ** -0.5]
    expected = [[math.sin(i * w[0]), math.cos(i * w[0]), math.sin(i * w[1]), math.cos(i * w[1])] for i in range(3)]
    torch.testing.assert_close(table, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_missing_peer_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "routing_transformer", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'refattn\[peer\]'"):
        make_attention("lucidrains", 16, 2, 32, False, AttentionConfig(), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="attention: expected one of dense, fsat, routing, lucidrains, local"):
        make_attention("linear", 16, 2, 32, False, AttentionConfig(), torch.Generator().manual_seed(0))


# -------------------------------------------------------------------------------------------- analysis


def test_dense_diagonal_profile_against_loops():
    torch.manual_seed(2)
    layer = DenseAttention(8, 2, causal=True).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    profile = analysis.dense_diagonal_profile(layer, x, None)
    with torch.no_grad():
        q, k, _ = layer.split(x)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    logits = (q @ k.transpose(-1, -2) / math.sqrt(4)).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    for h in range(2):
        for tau in range(-5, 6):
            entries = [float(probs[b, h, i, i + tau]) for b in range(2) for i in range(6) if 0 <= i + tau <= i]
            expected = sum(entries) / len(entries) if entries else 0.0
            assert profile[h, tau + 5] == pytest.approx(expected, abs=1e-12)
    assert profile[:, 5:].sum(dim=1).tolist() != [0.0, 0.0]  # tau = 0 carries weight ...
    assert profile[:, 6:].abs().max() == 0  # ... and no causal row sees the future


@pytest.mark.parametrize("cross_dim", [None, "head"], ids=["cross=qk", "cross=head"])
def test_fsat_scores_equal_the_reference_estimate(cross_dim):
    """The scores from the layer's cross inputs: q and k, or its own cross projection (the default)."""
    task = make_task("copy", 24)
    config = AttentionConfig(fsat_options=(("cross_dim", cross_dim),))
    model = Transformer(task, "fsat", ModelConfig(dim=16, heads=2, depth=1), config, seed=1).double().eval()
    batch = task.sample(2, np.random.default_rng(0))
    tokens = torch.from_numpy(batch.tokens)
    (x,) = analysis.attention_inputs(model, tokens, None)
    layer = model.attention_layers[0]
    scores = analysis.fsat_scores(layer, x, None)
    a, b = layer.qkv(x).chunk(3, dim=-1)[:2] if cross_dim is None else layer.cross(x).chunk(2, dim=-1)
    split = lambda t: t.view(2, 24, 2, 8).transpose(1, 2).detach().numpy()  # noqa: E731  (head width 8 = Dc)
    expected = ref.estimate(ref.cross(split(a), split(b)), layer.w.detach().numpy())
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10, atol=1e-12)
    model(tokens)  # eval-mode selection is the reference top-K of these scores
    assert torch.equal(layer.last_offsets, torch.from_numpy(ref.select(expected, layer.top_k, causal=True)))


def test_offset_hits_by_hand():
    offsets = torch.tensor([[[0, -3, -5], [0, -1, -2]], [[0, -5, -7], [0, -3, -1]]])  # (B=2, H=2, K=3)
    assert analysis.offset_hits(offsets, (-3, -5)) == [[0.5, 1.0], [0.5, 0.0]]


def test_routing_coverage_extremes():
    """One cluster holding every token covers every true key; against a naive membership check otherwise."""
    task = make_task("planted", 32)
    config = AttentionConfig(clusters=1, window=32, local_heads=1)
    model = Transformer(task, "routing", ModelConfig(dim=16, heads=2, depth=1), config, seed=0).double().eval()
    batch = task.sample(2, np.random.default_rng(0))
    (x,) = analysis.attention_inputs(model, torch.from_numpy(batch.tokens), None)
    assert analysis.routing_coverage(model.attention_layers[0], x, None, task.true_offsets) == [[1.0] * 8]
    config = AttentionConfig(clusters=4, window=4, local_heads=1)
    model = Transformer(task, "routing", ModelConfig(dim=16, heads=2, depth=1), config, seed=0).double().eval()
    (x,) = analysis.attention_inputs(model, torch.from_numpy(batch.tokens), None)
    layer = model.attention_layers[0]
    coverage = analysis.routing_coverage(layer, x, None, task.true_offsets)
    from refattn.backends.torch import routing  # the same membership, checked by sets

    q = layer.to_q(x).view(2, 32, 2, 8).transpose(1, 2)[:, :1]
    k = layer.to_k(x).view(2, 32, -1, 8).transpose(1, 2)[:, 1:]
    qm = routing.route(routing.similarity(routing.normalize(q), layer.means), 4)
    km = routing.route(routing.similarity(routing.normalize(k), layer.means), 4)
    for t, tau in enumerate(task.true_offsets):
        hits = total = 0
        for b in range(2):
            for i in range(max(0, -tau), min(32, 32 - tau)):
                total += 1
                hits += any(i in qm[b, 0, c].tolist() and i + tau in km[b, 0, c].tolist() for c in range(4))
        assert coverage[0][t] == pytest.approx(hits / total, abs=1e-12)
