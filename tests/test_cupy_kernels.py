"""The CuPy backend's CUDA kernels (backends/cupy/kernels/fsat_sparse_attention.cu), without a GPU.

- NVRTC compiles every source for sm_80 and sm_90 (PTX and CUBIN) with the options the backend hands to
  cupy.RawModule and those CuPy adds, every dtype instantiated, without warnings (needs the NVRTC
  library, pip install nvidia-cuda-nvrtc-cu12, or a cupy-cuda13x install's own);
- the arguments the host code passes to each launch match the kernel's parameter list (count, pointer or
  scalar, element dtype, scalar width);
- every kernel runs as CUDA C emulated on the CPU (REFATTN_CUDA_EMULATION=1, NumPy arrays) through the
  backend's own launch code and matches the reference refattn.fsat in float64, float32 and float16
  (masks, causal, -inf bias, Dv and D above one column chunk), also under AddressSanitizer and UBSan;
- regressions: an overflow of q . k reaches the caller as ValueError instead of NaN read as "no key".
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("cupy", reason="the CuPy backend needs cupy (pip install 'refattn[cupy]')")

import refattn.fsat as ref_fsat
from refattn.backends import cuda_emulation
from refattn.backends.cupy import fsat, kernels
from refattn.conformance.tolerances import FORWARD, GRADIENT, compare

DTYPES = ("float64", "float32", "float16")
ARCHS = ("-arch=compute_80", "-arch=sm_80", "-arch=compute_90", "-arch=sm_90")
CUPY_IMPLICIT_OPTIONS = ("-ftz=true",)  # cupy.cuda.compiler adds it to every NVRTC build


@pytest.fixture(autouse=True)
def _emulated(monkeypatch):
    monkeypatch.setenv(cuda_emulation.ENVIRONMENT_VARIABLE, "1")


# ------------------------------------------------------------------ NVRTC


def _nvrtc():
    from cupy.cuda import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as error:  # pragma: no cover - depends on the machine
        pytest.skip(f"NVRTC library not loadable ({error}); pip install nvidia-cuda-nvrtc-cu12")
    return nvrtc


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_source_compiles(arch):
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(kernels.SOURCE.read_text(), kernels.SOURCE.name, [], [])
    try:
        for expression in kernels.name_expressions():
            nvrtc.addNameExpression(program, expression)
        options = list(kernels.COMPILE_OPTIONS + CUPY_IMPLICIT_OPTIONS) + [arch]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            pytest.fail(f"{arch}: {error}\n{nvrtc.getProgramLog(program)}")
        log = nvrtc.getProgramLog(program).strip("\x00").strip()
        assert log == "", f"{arch} compiled with warnings:\n{log}"
        image = nvrtc.getPTX(program) if "compute_" in arch else nvrtc.getCUBIN(program)
        assert len(image) > 0
        for expression in kernels.name_expressions():
            lowered = nvrtc.getLoweredName(program, expression)
            assert lowered.startswith("_Z"), (expression, lowered)
            if "compute_" in arch:
                text = image.decode() if isinstance(image, bytes) else image
                assert f".entry {lowered}(" in text, (expression, lowered)
    finally:
        nvrtc.destroyProgram(program)


def test_every_kernel_is_instantiated_for_every_dtype():
    assert set(kernels.name_expressions()) == {f"{k}<{t}>" for k in kernels.KERNELS for t in
                                               ("double", "float", "refattn_half")}


def test_geometry_constants_match_the_source():
    code = kernels.SOURCE.read_text()
    assert re.search(rf"#define REFATTN_VPL {kernels.VALUES_PER_LANE}\b", code)
    assert "#define REFATTN_CHUNK (32 * REFATTN_VPL)" in code and kernels.COLUMNS == 32 * kernels.VALUES_PER_LANE


def _parameters(code: str, kernel: str) -> list[str]:
    match = re.search(rf"__global__ void {kernel}\((.*?)\)\s*\{{", code, re.DOTALL)
    assert match, kernel
    return [" ".join(p.split()) for p in match.group(1).split(",")]


def _expected_pointer(parameter: str, dtype: np.dtype) -> np.dtype:
    acc = np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    if "Traits<T>::Acc" in parameter:
        return acc
    if "long long*" in parameter:
        return np.dtype(np.int64)
    if "unsigned char*" in parameter:
        return np.dtype(np.uint8)
    assert re.search(r"\bT\*", parameter), parameter
    return np.dtype(dtype)


_SCALARS = {"long long": np.int64, "int": np.int32, "double": np.float64}


def _check_abi(kernel, dtype, args):
    parameters = _parameters(kernels.SOURCE.read_text(), kernel)
    assert len(args) == len(parameters), (kernel, len(args), parameters)
    for parameter, arg in zip(parameters, args, strict=True):
        if "*" in parameter:
            assert isinstance(arg, np.ndarray), (kernel, parameter, type(arg))
            assert arg.dtype == _expected_pointer(parameter, dtype), (kernel, parameter, arg.dtype)
            assert arg.flags.c_contiguous, (kernel, parameter)
        else:
            kind = parameter.rsplit(" ", 1)[0]
            assert type(arg) is _SCALARS[kind], (kernel, parameter, type(arg))


# The recorder launches nothing, so the kernels' output buffers stay uninitialised (np.empty) and
# casting them may overflow: harmless here, only the launch arguments are checked.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("biased, padded, with_dlse", [(False, False, False), (True, True, True)])
def test_host_launches_match_the_kernel_signatures(monkeypatch, dtype, biased, padded, with_dlse):
    launches = []

    def record(plan, kernel_dtype, args):
        launches.append((plan.kernel, np.dtype(kernel_dtype), plan, args))

    monkeypatch.setattr(kernels, "launch", record)
    rng = np.random.default_rng(0)
    batch, heads, length, dim, dim_v = 2, 3, 7, 5, 130
    q = rng.standard_normal((batch, heads, length, dim)).astype(dtype)
    v = rng.standard_normal((batch, heads, length, dim_v)).astype(dtype)
    offsets = np.tile(np.array([-2, 0, 3]), (batch, heads, 1))
    bias = rng.standard_normal(offsets.shape).astype(dtype) if biased else None
    mask = np.zeros((batch, length), dtype=bool)
    mask[0, -2:] = padded
    with contextlib.suppress(ValueError):  # the outputs nothing wrote may hold anything, NaN included
        fsat.sparse_attention(q, q, v, offsets, bias, key_padding_mask=mask if padded else None)
    with contextlib.suppress(ValueError):
        fsat.sparse_attention_vjp(q, q, v, offsets, bias, v, dlse=q[..., 0] if with_dlse else None,
                                  key_padding_mask=mask if padded else None)
    assert [name for name, *_ in launches] == list(kernels.KERNELS)
    for kernel, kernel_dtype, _, args in launches:
        assert kernel_dtype == np.dtype(dtype)
        _check_abi(kernel, kernel_dtype, args)
    forward, query, key = (launch for _, _, launch, _ in launches)
    assert forward.grid == (batch * heads * 2, 2, 1)  # ceil(7 / 4) tiles, ceil(130 / 128) chunks of v columns
    assert query.grid == (batch * heads * 2, 1, 1)  # chunks of dq columns (D = 5)
    assert key.grid == (batch * heads * 2, 2, 1)  # chunks of max(D, Dv)


# ------------------------------------------------------------------ the kernels against the reference


def _offsets(rng, batch, heads, length, count):
    candidates = np.arange(-(length - 1), length)
    return np.stack([rng.permutation(candidates)[:count] for _ in range(batch * heads)]).reshape(batch, heads, count)


def _problem(seed, batch, heads, length, dim, dim_v, count, *, causal=False, masked=False, bias="finite",
             dlse=False):
    """Inputs as float64 arrays; bias "neg_inf" sets -inf on some offsets (offsets without any valid pair)."""
    rng = np.random.default_rng(seed)
    x = {
        "q": rng.standard_normal((batch, heads, length, dim)),
        "k": rng.standard_normal((batch, heads, length, dim)),
        "v": rng.standard_normal((batch, heads, length, dim_v)),
        "dout": rng.standard_normal((batch, heads, length, dim_v)),
        "offsets": _offsets(rng, batch, heads, length, count),
        "bias": None if bias is None else rng.standard_normal((batch, heads, count)),
        "dlse": rng.standard_normal((batch, heads, length)) if dlse else None,
        "mask": None,
        "causal": causal,
    }
    if bias == "neg_inf":
        x["bias"][:, :, 0] = -np.inf
        x["bias"][0, 0, :] = -np.inf  # every logit of (0, 0) masked: no row there has a key
    if masked:
        mask = np.zeros((batch, length), dtype=bool)
        mask[0, -max(1, length // 3):] = True
        mask[1:, rng.permutation(length)[: length // 3]] = True
        x["mask"] = mask
    return x


CASES = {
    "plain": dict(batch=2, heads=2, length=13, dim=8, dim_v=8, count=4),
    "masked_causal_neg_inf_bias_dlse": dict(batch=2, heads=2, length=11, dim=6, dim_v=7, count=5, causal=True,
                                            masked=True, bias="neg_inf", dlse=True),
    "no_bias_masked": dict(batch=2, heads=1, length=7, dim=4, dim_v=4, count=3, masked=True, bias=None),
    "dv_above_one_chunk": dict(batch=1, heads=2, length=7, dim=5, dim_v=130, count=3),
    "d_above_one_chunk": dict(batch=1, heads=1, length=5, dim=130, dim_v=3, count=3, causal=True),
    "one_offset": dict(batch=2, heads=1, length=5, dim=4, dim_v=4, count=1),
    "every_offset": dict(batch=1, heads=2, length=5, dim=4, dim_v=6, count=9, masked=True),
    "length_one": dict(batch=2, heads=2, length=1, dim=3, dim_v=2, count=1, masked=False),
}


def _cast(x, dtype):
    """(the backend's inputs in ``dtype``, the reference's: the same values in float64)."""
    ours, theirs = {}, {}
    for name, value in x.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            ours[name] = value.astype(dtype)
            theirs[name] = ours[name].astype(np.float64)
        else:
            ours[name] = theirs[name] = value
    return ours, theirs


def _forward(module, x):
    return module.sparse_attention(x["q"], x["k"], x["v"], x["offsets"], x["bias"], causal=x["causal"],
                                   key_padding_mask=x["mask"])


def _backward(module, x):
    return module.sparse_attention_vjp(x["q"], x["k"], x["v"], x["offsets"], x["bias"], x["dout"], dlse=x["dlse"],
                                       causal=x["causal"], key_padding_mask=x["mask"])


def _assert_close(actual, expected, tolerance, what):
    difference = compare(actual, expected, tolerance)
    assert difference.ok, f"{what}: max abs error {difference.max_abs:.3g}, max rel {difference.max_rel:.3g}"


def _check_forward(x, dtype):
    ours, theirs = _cast(x, dtype)
    out, lse = _forward(fsat, ours)
    expected_out, expected_lse = _forward(ref_fsat, theirs)
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.dtype(dtype)
    _assert_close(out, expected_out, FORWARD[dtype], "out")
    _assert_close(lse, expected_lse, FORWARD[dtype], "lse")
    return expected_lse


def _check_backward(x, dtype):
    ours, theirs = _cast(x, dtype)
    grads = _backward(fsat, ours)
    expected = _backward(ref_fsat, theirs)
    for name, actual, wanted in zip(("dq", "dk", "dv", "dbias"), grads, expected, strict=True):
        if wanted is None:
            assert actual is None, name
            continue
        assert actual.dtype == np.dtype(dtype), name
        _assert_close(actual, wanted, GRADIENT[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_kernel_matches_the_reference(case, dtype):
    x = _problem(1, **CASES[case])
    expected_lse = _check_forward(x, dtype)
    if case == "masked_causal_neg_inf_bias_dlse":  # the case holds rows without any finite logit
        assert np.isneginf(expected_lse[0, 0]).all() and np.isneginf(expected_lse[1, 1]).sum() >= 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backward_kernels_match_the_reference(case, dtype):
    _check_backward(_problem(2, **CASES[case]), dtype)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 9), count=st.integers(1, 17), dim=st.integers(1, 9),
       dim_v=st.integers(1, 9), causal=st.booleans(), masked=st.booleans(), bias=st.sampled_from(["finite", None]))
def test_random_shapes_match_the_reference_in_float64(seed, length, count, dim, dim_v, causal, masked, bias):
    x = _problem(seed, 2, 1, length, dim, dim_v, min(count, 2 * length - 1), causal=causal, masked=masked,
                 bias=bias)
    _check_forward(x, "float64")
    _check_backward(x, "float64")




# ------------------------------------------------------------------ regressions (found by reading the kernels)


def test_an_overflow_of_q_dot_k_is_reported_not_read_as_a_row_without_keys():
    """q . k = +inf in float32 made the online softmax's sum NaN, and `sum > 0` read it as "no valid key":
    the forward returned NaN rows with lse = -inf (which the overflow check allows) and the gradient zeros."""
    q = np.ones((1, 1, 3, 4), dtype=np.float32)
    q[0, 0, 1] = 3e19  # q1 . q1 = 3.6e39 > float32's maximum; every other product is finite
    offsets = np.array([[[0, 1]]])
    with pytest.raises(ValueError, match=r"q and k overflow float32 in the sparse attention"):
        fsat.sparse_attention(q, q, q, offsets)
    with pytest.raises(ValueError, match=r"overflow float32 in the gradient of the sparse attention"):
        fsat.sparse_attention_vjp(q, q, q, offsets, None, q)


def test_a_logit_that_overflows_to_minus_inf_gets_weight_zero_as_in_the_reference():
    """q . k = -inf in float32 on a row's first offset made exp(-inf - -inf) = NaN; the reference (whose
    float64 logit is finite and hugely negative) gives that key weight 0, and so must the kernels."""
    q = np.ones((1, 1, 3, 4), dtype=np.float32)
    k = np.ones((1, 1, 3, 4), dtype=np.float32)
    q[0, 0, 1], k[0, 0, 0] = 3e19, -3e19  # q1 . k0 = -3.6e39 -> -inf; offset -1 comes first in row 1
    v = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    offsets = np.array([[[-1, 0]]])
    out, lse = fsat.sparse_attention(q, k, v, offsets)
    expected_out, expected_lse = ref_fsat.sparse_attention(q.astype(float), k.astype(float), v.astype(float), offsets)
    np.testing.assert_allclose(out, expected_out, rtol=1e-6)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-6)
    dout = np.ones_like(v)
    grads = fsat.sparse_attention_vjp(q, k, v, offsets, None, dout)
    expected = ref_fsat.sparse_attention_vjp(q.astype(float), k.astype(float), v.astype(float), offsets, None,
                                             dout.astype(float))
    for name, actual, wanted in zip(("dq", "dk", "dv"), grads, expected, strict=False):
        np.testing.assert_allclose(actual, wanted, rtol=1e-6, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------ the same kernels under the sanitizers


def test_the_kernels_match_the_reference_under_the_sanitizers():
    environment = {**os.environ, **cuda_emulation.sanitizer_environment(), cuda_emulation.ENVIRONMENT_VARIABLE: "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "--capture=sys",
               "-k", "match_the_reference and not sanitizers"]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1800,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
