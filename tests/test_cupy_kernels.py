"""NVRTC compile check of every CUDA kernel source of the CuPy backend, and the host/kernel ABI.

Every .cu file is compiled, with the exact options the backend hands to cupy.RawModule
(_config.COMPILE_OPTIONS) plus those CuPy adds itself, for sm_80 and sm_90 (PTX and CUBIN), with
every dtype instantiation registered as a name expression: a compile error, a warning, or a missing
instantiation fails. Needs only the NVRTC library (pip install nvidia-cuda-nvrtc-cu12), no GPU.

The ABI test records the arguments the host code passes to each launch (in host mode, with NumPy)
and compares them with the kernel's parameter list parsed from the .cu file: count, pointer vs
scalar, element dtype and scalar width.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("cupy", reason="the CuPy backend needs cupy (pip install 'refattn[cupy]')")

from refattn.backends.cupy import _config, _kernels, fsat, host_execution


def _nvrtc():
    from cupy.cuda import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as error:  # pragma: no cover - depends on the machine
        pytest.skip(f"NVRTC library not loadable ({error}); pip install nvidia-cuda-nvrtc-cu12")
    return nvrtc


@pytest.mark.parametrize("arch", _config.CHECKED_ARCHS)
@pytest.mark.parametrize("source", _config.SOURCES, ids=lambda s: s.filename)
def test_kernel_source_compiles(source, arch):
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(source.code(), source.filename, [], [])
    try:
        for expression in source.name_expressions():
            nvrtc.addNameExpression(program, expression)
        options = list(_config.COMPILE_OPTIONS + _config.CUPY_IMPLICIT_OPTIONS) + [arch]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            pytest.fail(f"{source.filename} {arch}: {error}\n{nvrtc.getProgramLog(program)}")
        log = nvrtc.getProgramLog(program).strip("\x00").strip()
        assert log == "", f"{source.filename} {arch} compiled with warnings:\n{log}"
        image = nvrtc.getPTX(program) if "compute_" in arch else nvrtc.getCUBIN(program)
        assert len(image) > 0
        for expression in source.name_expressions():
            lowered = nvrtc.getLoweredName(program, expression)
            assert lowered.startswith("_Z"), (expression, lowered)
            if "compute_" in arch:
                text = image.decode() if isinstance(image, bytes) else image
                assert f".entry {lowered}(" in text, (expression, lowered)
    finally:
        nvrtc.destroyProgram(program)


def test_every_kernel_is_instantiated_for_every_dtype():
    expressions = _config.FSAT_SPARSE.name_expressions()
    assert set(expressions) == {f"{k}<{t}>" for k in _config.FSAT_SPARSE.kernels for t in
                                ("double", "float", "refattn_half")}


def test_geometry_constants_match_the_source():
    code = _config.FSAT_SPARSE.code()
    assert re.search(rf"#define REFATTN_VPL {_config.VPL}\b", code)
    assert "#define REFATTN_CHUNK (32 * REFATTN_VPL)" in code and _config.CHUNK == 32 * _config.VPL


def _parameters(code: str, kernel: str) -> list[str]:
    match = re.search(rf"__global__ void {kernel}\((.*?)\)\s*\{{", code, re.DOTALL)
    assert match, kernel
    return [" ".join(p.split()) for p in match.group(1).split(",")]


def _expected_pointer(parameter: str, dtype: np.dtype) -> np.dtype:
    acc = _config.accumulation_dtype(dtype)
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
    parameters = _parameters(_config.FSAT_SPARSE.code(), kernel)
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

    def record(xp, source, kernel, kernel_dtype, launch, args):
        assert source is _config.FSAT_SPARSE
        launches.append((kernel, np.dtype(kernel_dtype), launch, args))

    monkeypatch.setattr(_kernels, "launch", record)
    rng = np.random.default_rng(0)
    batch, heads, length, dim, dim_v = 2, 3, 7, 5, 130
    q = rng.standard_normal((batch, heads, length, dim)).astype(dtype)
    v = rng.standard_normal((batch, heads, length, dim_v)).astype(dtype)
    offsets = np.tile(np.array([-2, 0, 3]), (batch, heads, 1))
    bias = rng.standard_normal(offsets.shape).astype(dtype) if biased else None
    mask = np.zeros((batch, length), dtype=bool)
    mask[0, -2:] = padded
    with host_execution():
        fsat.sparse_attention(q, q, v, offsets, bias, key_padding_mask=mask if padded else None)
        fsat.sparse_attention_vjp(q, q, v, offsets, bias, v, dlse=q[..., 0] if with_dlse else None,
                                  key_padding_mask=mask if padded else None)
    assert [name for name, *_ in launches] == list(_config.FSAT_SPARSE.kernels)
    for kernel, kernel_dtype, _, args in launches:
        assert kernel_dtype == np.dtype(dtype)
        _check_abi(kernel, kernel_dtype, args)
    forward, query, key = (launch for _, _, launch, _ in launches)
    assert forward.grid == (batch * heads * 2, 2, 1)  # ceil(7 / 4) tiles, ceil(130 / 128) chunks of v columns
    assert query.grid == (batch * heads * 2, 1, 1)  # chunks of dq columns (D = 5)
    assert key.grid == (batch * heads * 2, 2, 1)  # chunks of max(D, Dv)
