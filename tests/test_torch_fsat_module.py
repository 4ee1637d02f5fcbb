"""``FSATAttention`` (backends/torch/layers/fsat_attention.py): shapes, parameters, noise, truncation, learning."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refattn import fsat as ref  # noqa: E402
from refattn.backends.torch import FSATAttention  # noqa: E402
from refattn.backends.torch import fsat as F  # noqa: E402


def layer(**kw):
    """A small layer; cross inputs q and k unless the test asks otherwise."""
    torch.manual_seed(0)
    args = dict(dim=12, heads=3, top_k=4, cross_dim=None)
    args.update(kw)
    return FSATAttention(**args).double()


def test_shapes_parameters_and_offsets():
    attn = layer(causal=True)
    assert attn.w.shape == (3, 4) and torch.equal(attn.w, torch.ones(3, 4, dtype=torch.float64))
    assert attn.cross is None and attn.last_offsets is None
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    y = attn(x)
    assert y.shape == (2, 10, 12) and y.dtype == torch.float64
    offsets = attn.last_offsets
    assert offsets.shape == (2, 3, 4) and offsets.dtype == torch.int64
    assert bool((offsets <= 0).all()) and bool((offsets == 0).any(-1).all())  # causal, tau = 0 always
    assert "top_k=4" in repr(attn)


def test_forward_equals_functional_reference_in_eval_mode():
    """Eval mode: no noise; the layer is projections around the reference FSAT attention."""
    attn = layer().eval()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    y = attn(x, key_padding_mask=mask)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    split = lambda t: t.view(2, 9, 3, 4).transpose(1, 2).detach().numpy()  # noqa: E731
    out = ref.attention(split(q), split(k), split(v), attn.w.detach().numpy(), 4, key_padding_mask=mask.numpy())
    expected = attn.out(torch.from_numpy(out).transpose(1, 2).reshape(2, 9, 12))
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-11)
    # padded rows: the attention output is zero, so the layer outputs the output projection's bias
    torch.testing.assert_close(y[1, 6:], attn.out.bias.expand(3, 12))


def test_defaults_are_the_quality_benchmark_choices():
    """spec/fsat.md, "Exploration": a separate cross projection of the head width, Gumbel temperature 0.1,
    constant."""
    torch.manual_seed(0)
    attn = FSATAttention(dim=12, heads=3, top_k=4)
    assert attn.cross_dim == 4 and attn.cross.in_features == 12 and attn.cross.out_features == 2 * 3 * 4
    assert attn.w.shape == (3, 4)
    assert (attn.noise_scale, attn.noise_schedule) == (0.1, "constant") and attn.noise_temperature() == 0.1
    assert FSATAttention(dim=12, heads=3, top_k=4, cross_dim=7).w.shape == (3, 7)


def test_eval_is_deterministic_and_training_noise_is_seedable():
    attn = layer(top_k=3)
    x = torch.randn(2, 16, 12, dtype=torch.float64)
    attn.eval()
    y1, o1 = attn(x), attn.last_offsets
    y2, o2 = attn(x), attn.last_offsets
    assert torch.equal(y1, y2) and torch.equal(o1, o2)
    attn.train()
    attn.manual_seed(123)
    torch.manual_seed(5)
    a, oa = attn(x), attn.last_offsets
    attn.manual_seed(123)
    torch.manual_seed(6)  # the global RNG does not matter
    b, ob = attn(x), attn.last_offsets
    assert torch.equal(a, b) and torch.equal(oa, ob)
    draws = []
    for seed in range(5):
        attn.manual_seed(seed)
        attn(x)
        draws.append(attn.last_offsets)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # the noise changes the selection
    noise = attn.gumbel_noise(2, 16, x.device, torch.float64)
    assert noise.shape == (2, 3, 31) and bool(torch.isfinite(noise).all())


def test_user_generator():
    g = torch.Generator().manual_seed(9)
    attn = layer(generator=g)
    assert attn.generator is g
    attn.manual_seed(3)
    first = attn.gumbel_noise(1, 4, torch.device("cpu"), torch.float64)
    g.manual_seed(3)
    assert torch.equal(first, attn.gumbel_noise(1, 4, torch.device("cpu"), torch.float64))


def test_cross_projection_learns_only_through_the_estimator():
    """cross_dim: cross inputs from the detached input; w and the cross projection get gradient,
    and the layer input gets exactly the gradient it would get without the cross path."""
    attn = layer(cross_dim=2, causal=True).eval()
    assert attn.w.shape == (3, 2) and attn.cross.out_features == 2 * 3 * 2
    x = torch.randn(2, 11, 12, dtype=torch.float64, requires_grad=True)
    attn(x).square().sum().backward()
    assert float(attn.w.grad.abs().max()) > 0
    assert float(attn.cross.weight.grad.abs().max()) > 0
    assert float(attn.qkv.weight.grad.abs().max()) > 0
    dx = x.grad.clone()
    # the same forward with the cross inputs computed as constants: identical input gradient
    x2 = x.detach().clone().requires_grad_()
    a, b = attn.cross(x2.detach()).detach().chunk(2, dim=-1)
    split = lambda t, f: t.view(2, 11, 3, f).transpose(1, 2)  # noqa: E731
    q, k, v = attn.qkv(x2).chunk(3, dim=-1)
    out = F.attention(split(q, 4), split(k, 4), split(v, 4), attn.w, 4, causal=True, cross_q=split(a, 2),
                      cross_k=split(b, 2))
    attn.out(out.transpose(1, 2).reshape(2, 11, 12)).square().sum().backward()
    torch.testing.assert_close(x2.grad, dx, rtol=1e-12, atol=1e-12)


def test_dropout_on_attention_output():
    attn = layer(dropout=0.5)
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    attn.manual_seed(0)
    torch.manual_seed(0)
    a = attn(x)
    attn.manual_seed(0)
    torch.manual_seed(1)
    b = attn(x)  # same offsets (same noise), different dropout mask
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bad, error, message", [
    (dict(dim=10, heads=3), ValueError, r"^dim, heads: expected dim divisible by heads, got dim=10, heads=3$"),
    (dict(dim=12.0), TypeError, r"^dim: expected an integer, got float 12.0$"),
    (dict(dim="12"), TypeError, r"^dim: expected an integer, got str '12'$"),
    (dict(dim=0), ValueError, r"^dim: expected an integer .*, got 0$"),
    (dict(heads=True), TypeError, r"^heads: expected an integer, got bool True$"),
    (dict(top_k=0), ValueError, r"^top_k: expected an integer .*, got 0$"),
    (dict(top_k=2.0), TypeError, r"^top_k: expected an integer, got float 2.0$"),
    (dict(causal="yes"), TypeError, r"^causal: expected a bool \(True or False\), got str 'yes'$"),
    (dict(cross_dim=0), ValueError, r"^cross_dim: expected an integer .*, got 0$"),
    (dict(cross_dim=2.5), TypeError, r"^cross_dim: expected an integer, got float 2.5$"),
    (dict(cross_dim="auto"), ValueError, r"^cross_dim: expected 'head', None or an integer >= 1, got 'auto'$"),
    (dict(dropout=1.0), ValueError, r"^dropout: expected a probability in \[0, 1\), got 1.0$"),
    (dict(dropout=-0.1), ValueError, r"^dropout: expected a number in \[0, 1\], got -0.1$"),
    (dict(dropout="0.1"), TypeError, r"^dropout: expected a real number, got str '0.1'$"),
    (dict(generator=0), TypeError, r"^generator: expected a torch.Generator or None, got int$"),
    (dict(noise_scale=-0.1), ValueError, r"^noise_scale: expected a number >= 0, got -0.1$"),
    (dict(noise_scale=float("nan")), ValueError, r"^noise_scale: expected a finite number, got nan$"),
    (dict(noise_scale="1"), TypeError, r"^noise_scale: expected a real number, got str '1'$"),
    (dict(noise_final=float("inf")), ValueError, r"^noise_final: expected a finite number, got inf$"),
    (dict(noise_schedule="exponential"), ValueError,
     r"^noise_schedule: expected one of 'constant', 'linear', 'cosine', got 'exponential'$"),
    (dict(noise_steps=0), ValueError, r"^noise_steps: expected an integer .*, got 0$"),
    (dict(noise_steps=2.5), TypeError, r"^noise_steps: expected an integer, got float 2.5$"),
])
def test_rejects_bad_configuration(bad, error, message):
    """Every option, checked where it is given: a wrong type is a TypeError, a wrong value a ValueError,
    each naming the option (before, dim=12.0 failed inside torch's empty())."""
    with pytest.raises(error, match=message):
        layer(**bad)


def test_accepts_numpy_integers():
    """NumPy integers are integers (the functions accept them; the layer rejected np.int64(2))."""
    attn = FSATAttention(dim=np.int64(12), heads=np.int32(3), top_k=np.int64(2), cross_dim=np.uint8(2),
                         noise_steps=np.int64(3), noise_scale=np.float32(0.5))
    assert (attn.dim, attn.heads, attn.top_k, attn.cross_dim, attn.noise_steps) == (12, 3, 2, 2, 3)
    assert all(type(n) is int for n in (attn.dim, attn.heads, attn.top_k, attn.cross_dim, attn.noise_steps))
    assert attn(torch.randn(1, 5, 12)).shape == (1, 5, 12)


def test_rejects_bad_input():
    attn = layer()
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, L, dim\) = \('\*', '\*', 12\), got \(2, 5, 8\)$"):
        attn(torch.randn(2, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^x: expected a 3-D tensor \(B, L, dim\), got shape \(5, 12\)$"):
        attn(torch.randn(5, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^x: expected every axis of \(B, L, dim\) to be at least 1"):
        attn(torch.randn(2, 0, 12, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got ndarray$"):
        attn(np.zeros((2, 5, 12)))
    with pytest.raises(TypeError, match=r"^x: expected a real floating-point tensor, got dtype torch.int64$"):
        attn(torch.zeros(2, 5, 12, dtype=torch.int64))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^x: expected finite values, got 1 NaN or Inf entries$"):
        attn(x)


def test_rejects_an_input_of_another_dtype():
    """A float64 x given to a float32 layer: a TypeError naming x and both dtypes (before, nn.Linear's
    'mat1 and mat2 must have the same dtype'); under autocast any float dtype is cast as usual."""
    attn = FSATAttention(dim=12, heads=3, top_k=2)
    with pytest.raises(TypeError, match=r"^x: expected a tensor of the layer's dtype torch.float32, got torch.float64 "
                                        r"\(convert the input with x.to\(torch.float32\) or the layer with "
                                        r"layer.to\(torch.float64\)\)$"):
        attn(torch.randn(2, 5, 12, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn(torch.randn(2, 5, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_float32_module_backward():
    torch.manual_seed(0)
    attn = FSATAttention(16, 2, 5, causal=True, cross_dim=3)
    x = torch.randn(3, 20, 16, requires_grad=True)
    attn(x).sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad is not None for p in attn.parameters())


# ------------------------------------------------------------------------------ learning


def _sinusoidal(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class LagModel(torch.nn.Module):
    """Token + sinusoidal position embedding -> residual FSATAttention -> vocabulary logits."""

    def __init__(self, vocab, dim, heads, top_k, length, cross_dim=None):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.register_buffer("position", _sinusoidal(length, dim))
        self.attn = FSATAttention(dim, heads, top_k, causal=True, cross_dim=cross_dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(h + self.attn(h))


def _train_planted_lag(lag, cross_dim, device="cpu", max_steps=600):
    """Train on y_i = x_{i - lag} (random tokens, causal); return (steps, eval accuracy, eval offsets)."""
    vocab, dim, heads, top_k, length, batch = 16, 32, 2, 4, 32, 32
    torch.manual_seed(0)
    model = LagModel(vocab, dim, heads, top_k, length, cross_dim).to(device)
    model.attn.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)

    def batch_of_tokens():
        return torch.randint(0, vocab, (batch, length), generator=data).to(device)

    accuracy, offsets = 0.0, None
    for step in range(1, max_steps + 1):
        x = batch_of_tokens()
        target = torch.full_like(x, -100)
        target[:, lag:] = x[:, :-lag]
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, vocab), target.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                x = batch_of_tokens()
                predicted = model(x).argmax(-1)
                accuracy = float((predicted[:, lag:] == x[:, :-lag]).float().mean())
                offsets = model.attn.last_offsets
            model.train()
            if accuracy >= 0.97:
                return step, accuracy, offsets
    return max_steps, accuracy, offsets


@pytest.mark.parametrize("cross_dim", [None, 8], ids=["cross=qk", "cross=separate"])
def test_learns_planted_lag(cross_dim):
    """FSAT learns the index of the dominant element: after training, eval-mode selection (no noise)
    contains tau* = -lag in every sequence, and the copy task is solved."""
    lag = 7  # hidden from the model: only the targets depend on it
    start = time.perf_counter()
    steps, accuracy, offsets = _train_planted_lag(lag, cross_dim)
    elapsed = time.perf_counter() - start
    print(f"planted lag {lag} (cross_dim={cross_dim}): accuracy {accuracy:.3f} after {steps} steps, {elapsed:.1f} s")
    assert accuracy >= 0.97, f"accuracy {accuracy:.3f} after {steps} steps"
    # in every sequence some head selects tau* = -lag
    assert bool((offsets == -lag).any(-1).any(-1).all()), offsets[:2].tolist()


def test_learns_planted_lag_on_cuda():
    if not torch.cuda.is_available():
        print("skipping: torch.cuda.is_available() is False (no CUDA device on this machine)")
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    steps, accuracy, offsets = _train_planted_lag(7, None, device="cuda")  # pragma: no cover - needs CUDA
    assert accuracy >= 0.97 and bool((offsets == -7).any(-1).any(-1).all())  # pragma: no cover


def test_module_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        print("skipping: torch.cuda.is_available() is False (no CUDA device on this machine)")
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    attn = layer(cross_dim=3, causal=True).eval()  # pragma: no cover - needs CUDA
    x = torch.randn(2, 33, 12, dtype=torch.float64)  # pragma: no cover
    y = attn(x)  # pragma: no cover
    torch.testing.assert_close(attn.cuda()(x.cuda()).cpu(), y, rtol=1e-9, atol=1e-11)  # pragma: no cover


# ------------------------------------------------------------------------------ exploration options


def test_noise_temperature_schedules():
    """T(step) for each schedule, by hand: linear and cosine from 2.0 to 0.5 over 4 training forwards."""
    constant = layer(noise_scale=0.7)
    linear = layer(noise_scale=2.0, noise_schedule="linear", noise_final=0.5, noise_steps=4)
    cosine = layer(noise_scale=2.0, noise_schedule="cosine", noise_final=0.5, noise_steps=4)
    x = torch.randn(1, 6, 12, dtype=torch.float64)
    seen = {"constant": [], "linear": [], "cosine": []}
    for _ in range(6):
        for name, attn in (("constant", constant), ("linear", linear), ("cosine", cosine)):
            seen[name].append(attn.noise_temperature())
            attn(x)
    assert seen["constant"] == [0.7] * 6
    assert seen["linear"] == pytest.approx([2.0, 1.625, 1.25, 0.875, 0.5, 0.5], abs=1e-15)
    cos = [0.5 * (1 - math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1, 1)]
    assert seen["cosine"] == pytest.approx([2.0 - 1.5 * c for c in cos], abs=1e-15)
    assert int(linear.noise_step) == 6 and "noise_step" in linear.state_dict()
    linear.eval()
    linear(x)
    assert int(linear.noise_step) == 6  # eval forwards do not advance the schedule


def test_noise_is_scaled_gumbel_and_zero_temperature_is_greedy():
    """Training selection = eval selection of s + T g, with g the layer's Gumbel draw; T = 0 draws nothing
    and selects exactly what eval mode selects."""
    x = torch.randn(2, 16, 12, dtype=torch.float64)
    attn = layer(top_k=4, noise_scale=2.5)
    attn.train().manual_seed(11)
    attn(x)
    trained = attn.last_offsets
    attn.manual_seed(11)
    noise = 2.5 * attn.gumbel_noise(2, 16, x.device, torch.float64)
    q, k, _ = attn.qkv(x).chunk(3, dim=-1)
    split = lambda t: t.view(2, 16, 3, 4).transpose(1, 2).detach().numpy()  # noqa: E731
    s = ref.estimate(ref.cross(split(q), split(k)), attn.w.detach().numpy())
    expected = ref.select(s, 4, noise=noise.numpy())
    assert torch.equal(trained, torch.from_numpy(expected))
    greedy = layer(top_k=4, noise_scale=0.0).train()
    state = greedy.generator.get_state()
    greedy(x)
    assert torch.equal(greedy.generator.get_state(), state)  # no draw
    greedy_offsets = greedy.last_offsets
    greedy.eval()
    greedy(x)
    assert torch.equal(greedy_offsets, greedy.last_offsets)
