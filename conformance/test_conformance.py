"""The conformance checks as pytest tests, one per check, device and strategy, for the backend chosen in conftest.py."""

from __future__ import annotations

import pytest

from refattn import backends
from refattn.conformance import checks, runner


def _variants(name: str, check: checks.Check) -> list[tuple[str | None, backends.Strategy | None]]:
    """(device, strategy) pairs to run ``check`` on: one (None, None) when the backend does not load here."""
    try:
        backend = backends.get_backend(name)
    except (ImportError, TypeError):
        return [(None, None)]
    devices = backend.capabilities.devices or (None,)
    return [(device, strategy) for device in devices for strategy in runner.strategies_for(backend, check, device)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "check" not in metafunc.fixturenames:
        return
    name = backends.check_name(metafunc.config.getoption("--refattn-backend"), source="--refattn-backend")
    quick = metafunc.config.getoption("--refattn-quick")
    runs = [(check, device, strategy) for dtype in runner.DTYPES for check in runner.cases(dtype, quick=quick)
            for device, strategy in _variants(name, check)]
    metafunc.parametrize("backend_name", [name])
    metafunc.parametrize(("check", "device", "strategy"), runs,
                         ids=[f"{c.algorithm}.{c.function}-{c.dtype}-{d}-{s.name if s else '-'}-{c.case}"
                              for c, d, s in runs])


def test_backend_matches_the_reference(backend_name: str, check: checks.Check, device: str | None,
                                       strategy: backends.Strategy | None) -> None:
    try:
        backend = backends.get_backend(backend_name)
    except ImportError as error:
        pytest.skip(f"backend {backend_name} not available: {error}")
    if not backend.capabilities.devices:
        pytest.skip(f"backend {backend_name} has no device: {backend.capabilities.unavailable}")
    result = checks.run(check, backend, backends.get_backend(checks.REFERENCE), device=device, strategy=strategy)
    if result.status == "skip":
        pytest.skip(result.detail)
    assert result.status == "pass", (
        f"{result.detail} (max abs {result.max_abs}, max rel {result.max_rel}, against {result.against})")
