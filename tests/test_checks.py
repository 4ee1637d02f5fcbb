"""refattn.checks and the checked/core split of the reference's steps.

- arguments that are not arrays: flags that are not bools, numbers that are strings, ranges, NaN,
  NumPy integers and bools (accepted);
- arrays of another library handed to the reference (a torch tensor): a TypeError naming the argument;
- overflow of a computation: a ValueError naming the user's arguments and the cause, never an
  internal array;
- the value checks: one reduction, no false alarm when a sum of finite entries overflows;
- the cores: the namespace and dtype of their inputs; a composite call validates each input once.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from refattn import checks, fsat, routing
from refattn.fsat.attention import attention_core, check_attention
from refattn.fsat.cross import cross_core
from refattn.fsat.sparse_attention import sparse_attention_core
from refattn.routing.cluster_attention import cluster_attention_core
from refattn.routing.profiles import get_profile

REPO = Path(__file__).resolve().parents[1]
B, H, L, D = 2, 3, 6, 4


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, B, H, L, D))
    w = np.ones((H, D))
    centroids = routing.init_centroids(H, 2, D, rng=rng).means
    return q, k, v, w, centroids


# ------------------------------------------------------------------------------ flags and numbers


@pytest.mark.parametrize("call", [
    lambda q, k, v, w, mu: fsat.attention(q, k, v, w, 2, causal="yes"),
    lambda q, k, v, w, mu: fsat.select(np.zeros((1, 1, 3)), 2, causal="yes"),
    lambda q, k, v, w, mu: fsat.sparse_attention(q, k, v, np.zeros((B, H, 1), dtype=np.int64), causal=1),
    lambda q, k, v, w, mu: routing.attention(q, k, v, mu, causal="yes"),
    lambda q, k, v, w, mu: routing.local_attention(q, k, v, 2, causal=None),
], ids=["fsat.attention", "fsat.select", "fsat.sparse_attention", "routing.attention", "routing.local_attention"])
def test_causal_must_be_a_bool(data, call):
    with pytest.raises(TypeError, match=r"^causal: expected a bool \(True or False\), got"):
        call(*data)


def test_shared_qk_must_be_a_bool(data):
    q, k, v, w, mu = data
    with pytest.raises(TypeError, match=r"^shared_qk: expected a bool \(True or False\), got str 'no'"):
        routing.attention(q, k, v, mu, shared_qk="no")


def test_numpy_bools_and_integers_are_accepted(data):
    q, k, v, w, mu = data
    np.testing.assert_array_equal(fsat.attention(q, k, v, w, np.int64(2), causal=np.bool_(True)),
                                  fsat.attention(q, k, v, w, 2, causal=True))
    np.testing.assert_array_equal(routing.attention(q, k, v, mu, window=np.int32(3)),
                                  routing.attention(q, k, v, mu, window=3))


@pytest.mark.parametrize("decay", ["0.9", b"0.9", None, True])
def test_decay_must_be_a_number(data, decay):
    q, _, _, _, mu = data
    state = routing.CentroidState(mu, np.zeros((H, 2)), mu)
    with pytest.raises(TypeError, match=r"^decay: expected a real number, got"):
        routing.update_centroids(state, q, decay=decay)


@pytest.mark.parametrize("decay, message", [
    (1.5, r"^decay: expected a number in \[0, 1\], got 1.5"),
    (-0.1, r"^decay: expected a number in \[0, 1\], got -0.1"),
    (float("nan"), r"^decay: expected a finite number, got nan"),
])
def test_decay_range(data, decay, message):
    q, _, _, _, mu = data
    state = routing.CentroidState(mu, np.zeros((H, 2)), mu)
    with pytest.raises(ValueError, match=message):
        routing.update_centroids(state, q, decay=decay)


def test_beta_below_zero(data):
    q, _, _, _, mu = data
    with pytest.raises(ValueError, match=r"^beta: expected a number >= 0, got -1.0"):
        routing.commitment_loss(routing.normalize(q), mu, beta=-1.0)
    with pytest.raises(ValueError, match=r"^beta: expected a number >= 0"):
        routing.commitment_loss_vjp(routing.normalize(q), mu, beta=-1e-4)


def test_beta_and_dloss_are_not_strings(data):
    q, _, _, _, mu = data
    with pytest.raises(TypeError, match=r"^beta: expected a real number, got str '1e-4'"):
        routing.commitment_loss(routing.normalize(q), mu, beta="1e-4")
    with pytest.raises(TypeError, match=r"^dloss: expected a real number, got str"):
        routing.commitment_loss_vjp(routing.normalize(q), mu, "1.0")


def test_torch_layer_rejects_negative_commitment_and_text_decay():
    pytest.importorskip("torch", reason="the torch layer needs torch")
    from refattn.backends.torch import RoutingAttention

    with pytest.raises(ValueError, match=r"^commitment: expected a number >= 0, got -1.0"):
        RoutingAttention(dim=12, heads=3, num_clusters=2, commitment=-1.0)
    with pytest.raises(TypeError, match=r"^decay: expected a real number, got str '0.9'"):
        RoutingAttention(dim=12, heads=3, num_clusters=2, decay="0.9")
    with pytest.raises(TypeError, match=r"^causal: expected a bool"):
        RoutingAttention(dim=12, heads=3, num_clusters=2, causal="yes")


def test_integer_checks():
    assert checks.integer_in_range(np.int64(2), "top_k", low=1) == 2
    assert type(checks.integer_in_range(np.uint8(3), "top_k", low=1)) is int
    for value in (True, np.bool_(True), 2.0, "2", None):
        with pytest.raises(TypeError, match=r"^top_k: expected an integer, got"):
            checks.integer_in_range(value, "top_k", low=1)


def test_real_number_checks():
    assert checks.real_number(np.float32(0.5), "x") == 0.5
    assert checks.real_number(np.int64(1), "x", low=0.0, high=1.0) == 1.0
    with pytest.raises(ValueError, match=r"^x: expected a finite number, got inf"):
        checks.real_number(math.inf, "x")
    with pytest.raises(ValueError, match=r"^x: expected a number <= 2, got 3.0"):
        checks.real_number(3, "x", high=2.0)
    with pytest.raises(TypeError, match=r"^x: expected a real number, got complex"):
        checks.real_number(1j, "x")


def test_one_of_rejects_what_is_not_a_choice():
    with pytest.raises(ValueError, match=r"^profile: expected one of 'tacl', 'lucidrains', got 5"):
        routing.normalize(np.ones((1, 2)), profile=5)


# ------------------------------------------------------------------------------ arrays of other libraries


def test_torch_tensors_are_rejected_by_the_reference(data):
    torch = pytest.importorskip("torch", reason="the case needs torch tensors")
    q, k, v, w, mu = data
    tensors = {
        "plain": torch.from_numpy(q),
        "requires_grad": torch.from_numpy(q).requires_grad_(True),
        "bfloat16": torch.from_numpy(q).to(torch.bfloat16),
    }
    for kind, tensor in tensors.items():
        with pytest.raises(TypeError, match=r"^q: expected a NumPy array, got torch.Tensor: .*"
                                            r"refattn.get_backend\('torch'\)"):
            fsat.attention(tensor, k, v, w, 2)
        with pytest.raises(TypeError, match=r"^k: expected a NumPy array, got torch.Tensor"):
            routing.attention(q, tensor, v, mu)
        assert kind
    with pytest.raises(TypeError, match=r"^key_padding_mask: expected a NumPy array, got torch.Tensor"):
        fsat.attention(q, k, v, w, 2, key_padding_mask=torch.zeros(B, L, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^w: expected a NumPy array, got torch.Tensor"):
        fsat.estimate(np.zeros((B, H, 2 * L - 1, D)), torch.ones(H, D))


def test_objects_with_an_array_protocol_are_rejected():
    class Foreign:
        def __array__(self, dtype=None, copy=None):
            return np.zeros((1, 1, 2, 2))

    with pytest.raises(TypeError, match=r"^a: expected a NumPy array, got .*Foreign; convert it with numpy.asarray"):
        fsat.cross(Foreign(), np.zeros((1, 1, 2, 2)))


def test_lists_are_numpy_arrays():
    a = [[[[1.0, 2.0], [3.0, 4.0]]]]
    np.testing.assert_array_equal(fsat.cross(a, a), fsat.cross(np.asarray(a), np.asarray(a)))


def test_a_missing_array_names_the_argument(data):
    q, k, v, _, _ = data
    with pytest.raises(TypeError, match=r"^dout: expected a real floating-point array, got dtype object"):
        routing.local_attention_vjp(q, k, v, 2, None)


# ------------------------------------------------------------------------------ overflow


def test_fsat_overflow_in_the_cross_names_q_and_k(data):
    q, k, v, w, _ = data
    with pytest.raises(ValueError, match=r"^q and k overflow float64 in the cross: \|q\|·\|k\| up to \d\.\de\+3\d\d$"):
        fsat.attention(q * 1e160, k * 1e160, v, w, 2)
    with pytest.raises(ValueError, match=r"^cross_q and cross_k overflow float64 in the cross"):
        fsat.attention(q, k, v, w, 2, cross_q=q * 1e160, cross_k=k * 1e160)
    with pytest.raises(ValueError, match=r"^q and k overflow float64 in the cross"):
        fsat.attention_vjp(q * 1e160, k * 1e160, v, w, 2, v)
    with pytest.raises(ValueError, match=r"^a and b overflow float64 in the cross"):
        fsat.cross(q * 1e160, k * 1e160)


def test_fsat_overflow_in_the_attention_logits(data):
    q, k, v, w, _ = data
    offsets = np.broadcast_to(np.array([-1, 0, 1]), (B, H, 3)).copy()
    with pytest.raises(ValueError, match=r"^q and k overflow float64 in the sparse attention: \|q\|·\|k\| up to"):
        fsat.sparse_attention(q * 1e160, k * 1e160, v, offsets)


def test_fsat_overflow_in_the_estimate_names_w(data):
    q, k, v, w, _ = data
    with pytest.raises(ValueError, match=r"^q, k and w overflow float64 in the estimate"):
        fsat.attention(q * 1e100, k * 1e100, v, w * 1e200, 2)


def test_routing_overflow_names_q_and_k(data):
    q, k, v, _, mu = data
    with pytest.raises(ValueError, match=r"^q and k overflow float64 in the cluster attention: \|q\|·\|k\| up to"):
        routing.attention(q * 1e160, k * 1e160, v, mu, profile="lucidrains")
    with pytest.raises(ValueError, match=r"^centroids overflows float64 in the similarity of the normalized q"):
        routing.attention(q, k, v, mu * 1e308)


def test_routing_overflow_in_the_normalization_names_x():
    """Finite x near float64's largest value: tacl's mean overflows, and x̂ would be NaN."""
    x = np.random.default_rng(0).uniform(-1.0, 1.0, (1, 1, 4, 8)) * 1.5e308
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(ValueError, match=r"^x overflows float64 in the normalization: \|x\| up to 1\.\de\+308$"):
            routing.normalize(x)
        np.testing.assert_allclose(np.linalg.norm(routing.normalize(x * 1e-160), axis=-1), np.sqrt(8), rtol=1e-12)


def test_overflow_check_on_a_backend_dtype():
    x = np.full((4,), 1e20, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^q and k overflow float32 in the cross: \|q\|·\|k\| up to 1\.0e\+40$"):
        checks.check_overflow(x * x, "the cross", q=x, k=x)


def test_overflow_check_on_torch_tensors():
    """The helper the torch backend calls in its own dtypes; the meta device has no values to check."""
    torch = pytest.importorskip("torch", reason="the case needs torch tensors")
    q = torch.full((2, 8), 1e20)
    with pytest.raises(ValueError,
                       match=r"^q and k overflow float32 in the attention logits: \|q\|·\|k\| up to 1\.0e\+40"):
        checks.check_overflow((q * q).sum(-1), "the attention logits", q=q, k=q)
    for dtype, value in ((torch.bfloat16, 1e20), (torch.float16, 300.0)):
        x = torch.full((2, 8), value, dtype=dtype)
        with pytest.raises(ValueError, match=rf"^q and k overflow {str(dtype)[6:]} in the attention logits"):
            checks.check_overflow((x * x).sum(-1), "the attention logits", q=x, k=x)
    checks.check_overflow(torch.full((3,), 6e4, dtype=torch.float16), "the step", x=q)  # sum overflows, entries finite
    checks.check_overflow(torch.empty(4, device="meta"), "the step", x=q)
    with pytest.raises(ValueError, match=r"^x: expected finite values, got 1 NaN or Inf entries"):
        checks.float_array(torch.tensor([0.0, float("nan")]), "x")


def _overflow_cases():
    """(name, call(namespace, arrays)) of float64 inputs that overflow one result of each step with a rule."""
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 1, 2, 8, 4))
    c, ds = rng.standard_normal((1, 2, 15, 4)), rng.standard_normal((1, 2, 15))
    w, mu = np.ones((2, 4)), rng.standard_normal((2, 3, 4))
    offsets = np.broadcast_to(np.array([-1, 0, 1]), (1, 2, 3)).copy()
    x_hat = routing.normalize(q)
    members = np.broadcast_to(np.arange(8).reshape(2, 4), (1, 2, 2, 4)).copy()
    do, dscores = rng.standard_normal((1, 2, 2, 4, 4)), rng.standard_normal((1, 2, 8, 3))
    huge, huge_o = rng.uniform(0.5, 1.0, (1, 2, 8, 4)) * 1.5e308, rng.uniform(0.5, 1.0, (1, 2, 2, 4, 4)) * 1.5e308
    shared = np.array([[0, 1, 2, 3], [0, 4, 5, 6]])[None, None].repeat(2, 1)  # token 0 in both clusters
    state = routing.CentroidState(mu, np.ones((2, 3)), rng.standard_normal((2, 3, 4)))
    big = 1e160
    return {
        "fsat.cross": lambda ns, t: ns.cross(t(q * big), t(k * big)),
        "fsat.cross_vjp": lambda ns, t: ns.cross_vjp(t(q), t(k * big), t(c * big)),
        "fsat.estimate": lambda ns, t: ns.estimate(t(c * 1e200), t(w * 1e200)),
        "fsat.estimate_vjp": lambda ns, t: ns.estimate_vjp(t(c), t(w * 1e200), t(ds * 1e200)),
        "fsat.sparse_attention": lambda ns, t: ns.sparse_attention(t(q * big), t(k * big), t(v), t(offsets)),
        "fsat.sparse_attention_vjp": lambda ns, t: ns.sparse_attention_vjp(t(q), t(k), t(v * big), t(offsets), None,
                                                                         t(v * big)),
        "fsat.attention cross": lambda ns, t: ns.attention(t(q), t(k), t(v), t(w), 3, cross_q=t(q * big),
                                                           cross_k=t(k * big)),
        "fsat.attention estimate": lambda ns, t: ns.attention(t(q * 1e100), t(k * 1e100), t(v), t(w * 1e200), 3),
        "fsat.attention logits": lambda ns, t: ns.attention(t(q * big), t(k * big), t(v), t(w), 3, cross_q=t(q),
                                                            cross_k=t(k)),
        "fsat.attention_vjp": lambda ns, t: ns.attention_vjp(t(q), t(k), t(v * big), t(w), 3, t(v * big)),
        "routing.normalize": lambda ns, t: ns.normalize(t(huge)),
        "routing.normalize_vjp": lambda ns, t: ns.normalize_vjp(t(q * 1e-10), t(q * 1e306)),
        "routing.similarity": lambda ns, t: ns.similarity(t(x_hat * 1e200), t(mu * 1e200)),
        "routing.similarity_vjp": lambda ns, t: ns.similarity_vjp(t(x_hat), t(mu * 1e200), t(dscores * 1e200)),
        "routing.local_attention": lambda ns, t: ns.local_attention(t(q * big), t(k * big), t(v), 4),
        "routing.local_attention_vjp": lambda ns, t: ns.local_attention_vjp(t(q), t(k), t(v * big), 4, t(v * big)),
        "routing.cluster_attention": lambda ns, t: ns.cluster_attention(t(q * big), t(k * big), t(v), t(members),
                                                                      t(members), profile="lucidrains"),
        "routing.cluster_attention_vjp": lambda ns, t: ns.cluster_attention_vjp(t(q), t(k), t(v * big), t(members),
                                                                              t(members), t(do * big)),
        "routing.combine": lambda ns, t: ns.combine(t(huge_o), t(shared), 8),
        "routing.update_centroids": lambda ns, t: ns.update_centroids(routing.CentroidState(*map(t, state)), t(huge)),
        "routing.commitment_loss": lambda ns, t: ns.commitment_loss(t(x_hat * 1e200), t(mu)),
        "routing.commitment_loss_vjp": lambda ns, t: ns.commitment_loss_vjp(t(x_hat * 1e200), t(mu), 1e200),
        "routing.attention logits": lambda ns, t: ns.attention(t(q * big), t(k * big), t(v), t(mu),
                                                               profile="lucidrains"),
        "routing.attention combination": lambda ns, t: ns.attention(t(q), t(k), t(huge), t(mu[:, :2]), window=8),
        "routing.attention similarity": lambda ns, t: ns.attention(t(q), t(k), t(v), t(mu * 1e308)),
        "routing.attention_vjp": lambda ns, t: ns.attention_vjp(t(q), t(k), t(v * big), t(mu), t(v * big)),
        "routing.attention_vjp logits": lambda ns, t: ns.attention_vjp(t(q * big), t(k * big), t(v), t(mu), t(v),
                                                                     profile="lucidrains"),
    }


@pytest.mark.parametrize("name", sorted(_overflow_cases()))
def test_torch_reports_an_overflow_as_the_reference_does(name):
    """The torch backend applies the reference's OVERFLOWS rules (and its composites' checks): in float64,
    the same inputs overflow the same result, with the same message."""
    torch = pytest.importorskip("torch", reason="the case compares the torch backend with the reference")
    import refattn

    backend = refattn.get_backend("torch")
    call = _overflow_cases()[name]
    namespace = name.split(".")[0]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="overflow") as expected:
            call(getattr(refattn, namespace), lambda x: x)
        with pytest.raises(ValueError, match="overflow") as got:
            call(getattr(backend, namespace), torch.from_numpy)
    assert str(got.value) == str(expected.value)


def test_torch_gradient_of_the_routing_attention_skips_the_forward_checks_as_the_reference():
    """Its out overflows (every token in both clusters, v near float64's largest value), its gradients do
    not: attention raises, attention_vjp returns the reference's gradients."""
    torch = pytest.importorskip("torch", reason="the case compares the torch backend with the reference")
    import refattn

    rng = np.random.default_rng(2)
    q, k, dout = rng.standard_normal((3, 1, 2, 8, 4))
    v, mu = rng.uniform(0.9, 1.0, (1, 2, 8, 4)) * 1.5e308, rng.standard_normal((2, 2, 4))
    backend = refattn.get_backend("torch").routing
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="^v overflows float64 in the combination"):
        backend.attention(*map(torch.from_numpy, (q, k, v, mu)), window=8)
    want = routing.attention_vjp(q, k, v, mu, dout * 1e-300, window=8)
    got = backend.attention_vjp(*map(torch.from_numpy, (q, k, v, mu, dout * 1e-300)), window=8)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-10, atol=0)


def test_overflow_rules_check_each_result_by_the_rule_at_its_position():
    """checks.check_overflows: a step module's OVERFLOWS rules, each on the result at its position, its operands
    picked by name in the rule's order; a None rule or result is skipped; one rule covers the whole result."""
    rules = (checks.Overflow("the step", ("b", "a")), None, checks.Overflow("the step", ("b",), allow_neg_inf=True))
    a, b = np.full(2, 1e200), np.full(2, 1e100)
    finite, infinite = np.ones(2), np.array([1.0, np.inf])
    checks.check_overflows((finite, infinite, np.array([-np.inf])), rules, a=a, b=b)
    checks.check_overflows((finite, None, None), rules, a=a, b=b)
    with pytest.raises(ValueError, match=r"^b and a overflow float64 in the step: \|b\|·\|a\| up to 1\.0e\+300$"):
        checks.check_overflows((infinite, finite, finite), rules, a=a, b=b)
    with pytest.raises(ValueError, match=r"^b overflows float64 in the step: \|b\| up to 1\.0e\+100$"):
        checks.check_overflows((finite, finite, infinite), rules, a=a, b=b)
    with pytest.raises(ValueError, match=r"^b and a overflow float64 in the step"):
        checks.check_overflows((finite, infinite), rules[:1], a=a, b=b)  # one rule: the tuple as a whole
    seen = []

    def watch(result, where, *, allow_neg_inf=False, **operands):  # a backend's check (Numba's Call.watch)
        seen.append((where, allow_neg_inf, list(operands)))

    checks.check_overflows((finite, finite, finite), rules, check=watch, a=a, b=b)
    assert seen == [("the step", False, ["b", "a"]), ("the step", True, ["b"])]


def test_every_step_module_states_overflow_rules_of_its_own_functions_and_arguments():
    """OVERFLOWS keys are the module's public functions; every operand a rule names is an argument of it."""
    modules = {getattr(package, name).__module__ for package in (fsat, routing) for name in package.__all__
               if callable(getattr(package, name)) and not isinstance(getattr(package, name), type)}
    stated = 0
    for module in map(importlib.import_module, sorted(modules)):
        for name, rules in getattr(module, "OVERFLOWS", {}).items():
            parameters = inspect.signature(getattr(module, name)).parameters
            for rule in filter(None, rules):
                assert set(rule.operands) <= set(parameters), (module.__name__, name, rule)
                stated += 1
    assert stated == 38  # every result check the step modules make


def test_overflow_check_passes_finite_results_whose_sum_overflows():
    huge = np.full(4, 1e308)
    checks.check_overflow(huge, "the step", x=huge)
    checks.check_overflow(np.array([0.0, -np.inf]), "the step", allow_neg_inf=True, x=huge)
    with pytest.raises(ValueError, match=r"^x overflows float64 in the step"):
        checks.check_overflow(np.array([0.0, np.nan]), "the step", allow_neg_inf=True, x=huge)
    with pytest.raises(ValueError, match=r"^x overflows float64"):
        checks.check_overflow(np.array([0.0, -np.inf]), "the step", x=huge)
    with pytest.raises(ValueError, match=r"^q overflows float64 in the step: \|q\| up to 1\.0e\+308$"):
        checks.check_overflow(np.array([np.inf]), "the step", q=huge, k=None)  # k not given: not named
    checks.check_overflow((np.ones(2), None), "the gradient", dout=huge)  # a tuple: each part, None skipped
    with pytest.raises(ValueError, match=r"^dout overflows float64 in the gradient"):
        checks.check_overflow((np.ones(2), None, np.array([np.nan])), "the gradient", dout=huge)


def test_finite_check_has_no_false_alarm_and_counts_the_culprits():
    checks.float_array(np.full((3, 3), 1e308), "x")  # the sum overflows, the entries are finite
    bad = np.zeros(5)
    bad[[1, 3]] = [np.nan, -np.inf]
    with pytest.raises(ValueError, match=r"^x: expected finite values, got 2 NaN or Inf entries"):
        checks.float_array(bad, "x")
    with pytest.raises(ValueError, match=r"^s: expected finite values or -inf, got NaN or \+Inf entries"):
        checks.float_array(np.array([-np.inf, np.nan]), "s", allow_neg_inf=True)
    checks.float_array(np.array([-np.inf, 0.0]), "s", allow_neg_inf=True)


def test_value_checks_are_one_reduction():
    """A passing finite check makes one NumPy call on the array: the sum (no elementwise temporary)."""
    calls: list[tuple[str, str]] = []

    class Recording(np.ndarray):
        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            calls.append((ufunc.__name__, method))
            inputs = tuple(np.asarray(x) for x in inputs)
            return getattr(ufunc, method)(*inputs, **kwargs)

    checks.float_array(np.ones((2, 3)).view(Recording), "x")
    assert calls == [("add", "reduce")]
    calls.clear()
    checks.float_array(np.ones((2, 3)).view(Recording), "s", allow_neg_inf=True)
    assert calls == [("maximum", "reduce")]


# ------------------------------------------------------------------------------ checks and cores


def test_composite_call_validates_each_input_once(data, monkeypatch):
    q, k, v, w, _ = data
    checked: list[str] = []
    original = checks.expect_finite

    def counting(x, name, **kwargs):
        checked.append(name)
        return original(x, name, **kwargs)

    monkeypatch.setattr(checks, "expect_finite", counting)
    fsat.attention(q, k, v, w, 2, noise=np.zeros((B, H, 2 * L - 1)))
    assert sorted(checked) == ["k", "noise", "q", "v", "w"]
    checked.clear()
    fsat.attention_vjp(q, k, v, w, 2, v, cross_q=q, cross_k=k)
    assert sorted(checked) == ["cross_k", "cross_q", "dout", "k", "q", "v", "w"]
    checked.clear()
    routing.attention_vjp(q, k, v, routing.init_centroids(H, 2, D, rng=np.random.default_rng(1)).means, v)
    assert sorted(checked) == ["centroids", "dout", "k", "q", "v"]


def test_cores_compute_in_their_inputs_dtype(data):
    q, k, v, w, mu = data
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    c32 = cross_core(q32, k32)
    assert c32.dtype == np.float32
    np.testing.assert_allclose(c32, fsat.cross(q32, k32), rtol=1e-5, atol=1e-6)
    offsets = np.broadcast_to(np.array([-1, 0, 2]), (B, H, 3)).copy()
    out32, lse32 = sparse_attention_core(q32, k32, v32, offsets)
    assert out32.dtype == lse32.dtype == np.float32
    out, lse = fsat.sparse_attention(q, k, v, offsets)
    np.testing.assert_allclose(out32, out, rtol=1e-4, atol=1e-5)
    members = routing.route(routing.similarity(routing.normalize(q), mu), 3)
    o32 = cluster_attention_core(q32, k32, v32, members, members, profile=get_profile("tacl"))
    assert o32.dtype == np.float32
    np.testing.assert_allclose(o32, routing.cluster_attention(q, k, v, members, members), rtol=1e-4, atol=1e-5)
    out32 = attention_core(q32, k32, v32, w.astype(np.float32), 2)
    assert out32.dtype == np.float32


def test_checks_return_the_arguments_in_their_order(data):
    q, k, v, w, mu = data
    checked = check_attention(q, k, v, w, np.int64(2), False, None, None, None, None)
    assert checked[:4] == (q, k, v, w) and checked[4:] == (2, False, None, None, None, None)
    assert type(checked[4]) is int
    from refattn.routing.cluster_attention import routed_inputs

    q2, k2, v2, causal, shared_qk, profile = routed_inputs(q, None, v, False, True, "lucidrains")
    assert (q2, k2, v2, causal, shared_qk, profile.name) == (q, None, v, False, True, "lucidrains")


def test_array_namespace():
    assert checks.array_namespace(np.zeros(1), None) is np
    assert checks.array_namespace() is np
    import scipy.fft

    assert checks.fft_namespace(np) is scipy.fft


STEP_MODULES = sorted((REPO / "refattn" / "fsat").glob("*.py")) + sorted((REPO / "refattn" / "routing").glob("*.py"))


@pytest.mark.parametrize("path", STEP_MODULES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_steps_compute_through_their_inputs_namespace(path):
    """No step calls a NumPy function directly (``np.einsum(...)``): they call ``xp``, the namespace of
    their inputs, so that the same code runs on CuPy arrays. NumPy dtypes and constants are fine."""
    tree = ast.parse(path.read_text())
    direct = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and _root(node.func) == "np"]
    assert direct == [], f"{path.name}: np.<function>(...) called on lines {direct}"


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_reading_a_torch_tensor_that_requires_grad_warns_nothing() -> None:
    """The checks read values out of autograd's graph: no "requires_grad=True to a scalar" warning in every forward."""
    torch = pytest.importorskip("torch")
    x = torch.ones(2, 3, requires_grad=True) * 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checks.expect_finite(x, "q")
        checks.expect_finite(x, "s", allow_neg_inf=True)
        checks.check_overflow(x, "the cross", q=x, k=x)
        checks.check_overflow(x, "the estimate", allow_neg_inf=True, q=x)
