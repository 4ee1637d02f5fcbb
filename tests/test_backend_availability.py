"""A backend that loads but has no device here: its functions raise BackendUnavailableError with the reason and
how to run it without a GPU, at the first call through refattn.ops or get_backend, in a short traceback; what it
can do stays readable (capabilities, status) for ``refattn info``, the conformance suite and ``refattn audit``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import refattn

CALL = """
    import numpy as np
    import refattn

    q = np.zeros((1, 2, 8, 4))
    refattn.ops.fsat.attention(q, q, q, np.ones((2, 4)), 2)
"""


def _run(code: str, env: dict[str, str], unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key not in unset}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, timeout=300)


def _without_a_device(name: str, module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    if refattn.get_backend(name).capabilities.devices:
        pytest.skip(f"{name} has a device here: this test is about machines without one")


def test_numba_cuda_without_cuda_names_the_reason_and_the_simulator() -> None:
    """The report: ``REFATTN_BACKEND=numba_cuda`` without CUDA ended in a long Numba CudaSupportError traceback."""
    _without_a_device("numba_cuda", "numba")
    result = _run(CALL, {"REFATTN_BACKEND": "numba_cuda"}, unset=("NUMBA_ENABLE_CUDASIM",))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("refattn.backends.BackendUnavailableError: backend 'numba_cuda' cannot compute on this "
                           "machine: "), result.stderr
    assert "NUMBA_ENABLE_CUDASIM=1" in last
    assert result.stderr.count('File "') <= 3, result.stderr  # the call, ops' attribute, the registry's guard
    # Numba's frames, by where its packages are installed: the checkout's own path may contain "numba" too.
    numba_files = [str(Path(importlib.util.find_spec(name).origin).parent) for name in ("numba", "numba_cuda")
                   if importlib.util.find_spec(name) is not None]
    frames = [line for line in result.stderr.splitlines() if line.lstrip().startswith("File")]
    assert not any(place in line for place in numba_files for line in frames), result.stderr


def test_cupy_without_a_device_and_emulation_off_names_the_reason_and_the_emulation() -> None:
    _without_a_device("cupy", "cupy")
    result = _run(CALL, {"REFATTN_BACKEND": "cupy"}, unset=("REFATTN_CUDA_EMULATION",))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("refattn.backends.BackendUnavailableError: backend 'cupy' cannot compute on this machine: "
                           "no CUDA device"), result.stderr
    assert "REFATTN_CUDA_EMULATION=1" in last
    assert result.stderr.count('File "') <= 3, result.stderr


@pytest.mark.parametrize(("name", "module"), [("cupy", "cupy"), ("numba_cuda", "numba")])
def test_get_backend_keeps_what_the_backend_can_do_readable(name: str, module: str) -> None:
    _without_a_device(name, module)
    backend = refattn.get_backend(name)
    assert backend.capabilities.devices == () and backend.capabilities.unavailable
    assert backend.status
    q = np.zeros((1, 1, 3, 2))
    for call in (lambda: backend.fsat.attention(q, q, q, np.ones((1, 2)), 2),
                 lambda: backend.routing.normalize(q),
                 lambda: backend.fsat.cross(q, q)):
        with pytest.raises(refattn.BackendUnavailableError, match=rf"backend '{name}' cannot compute on this machine: "
                                                                  rf"{re.escape(backend.capabilities.unavailable)}"):
            call()
    assert backend.fsat.attention.__name__ == "attention"  # introspection still sees the function


def test_a_third_party_backend_without_a_device_says_so(tmp_path: Path) -> None:
    (tmp_path / "deviceless.py").write_text(textwrap.dedent("""
        import refattn
        from refattn.backends import Backend, Capabilities

        def backend():
            return Backend(name="deviceless", fsat=refattn.fsat, routing=refattn.routing,
                           capabilities=Capabilities(dtypes=("float64",), devices=(),
                                                     unavailable="the accelerator is switched off"))
    """))
    dist_info = tmp_path / "deviceless-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: deviceless\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[refattn.backends]\ndeviceless = deviceless:backend\n")
    result = _run(CALL, {"REFATTN_BACKEND": "deviceless", "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "refattn.backends.BackendUnavailableError: backend 'deviceless' cannot compute on this machine: the "
        "accelerator is switched off; 'refattn info' shows what every backend can use here")


def test_backends_with_a_device_are_returned_as_they_are() -> None:
    assert refattn.get_backend("numpy").fsat is refattn.fsat
    if importlib.util.find_spec("torch") is not None:
        from refattn.backends import torch as torch_backend

        assert refattn.get_backend("torch").fsat is torch_backend.fsat


def test_cupy_with_the_emulation_switched_on_is_left_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """REFATTN_CUDA_EMULATION=1 runs CuPy's kernels as CUDA C on the CPU: the registry does not stand in the way."""
    _without_a_device("cupy", "cupy")
    from refattn import backends
    from refattn.backends import cupy as cupy_backend

    monkeypatch.setenv("REFATTN_CUDA_EMULATION", "1")
    backends.get_backend.cache_clear()
    try:
        assert backends.get_backend("cupy").fsat is cupy_backend.fsat
    finally:
        backends.get_backend.cache_clear()
