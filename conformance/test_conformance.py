"""The conformance checks as pytest tests, one per check, for the backend chosen in conftest.py."""

from __future__ import annotations

import pytest

from refattn import backends
from refattn.conformance import checks, runner


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "check" not in metafunc.fixturenames:
        return
    name = backends.check_name(metafunc.config.getoption("--refattn-backend"), source="--refattn-backend")
    quick = metafunc.config.getoption("--refattn-quick")
    cases = [check for dtype in runner.DTYPES for check in runner.cases(dtype, quick=quick)]
    metafunc.parametrize("backend_name", [name])
    metafunc.parametrize("check", cases, ids=[f"{c.algorithm}.{c.function}-{c.dtype}-{c.case}" for c in cases])


def test_backend_matches_the_reference(backend_name: str, check: checks.Check) -> None:
    try:
        backend = backends.get_backend(backend_name)
    except ImportError as error:
        pytest.skip(f"backend {backend_name} not available: {error}")
    if not backend.capabilities.devices:
        pytest.skip(f"backend {backend_name} has no device: {backend.capabilities.unavailable}")
    result = checks.run(check, backend, backends.get_backend(checks.REFERENCE))
    if result.status == "skip":
        pytest.skip(result.detail)
    assert result.status == "pass", (
        f"{result.detail} (max abs {result.max_abs}, max rel {result.max_rel}, against {result.against})")
