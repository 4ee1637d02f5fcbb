"""Test-suite settings: property-based tests are reproducible under CI (one fixed seed), so a red run
reproduces; elsewhere each run draws new examples."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

CI_SEED = 0

settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("dev")


def pytest_configure(config: pytest.Config) -> None:
    # A fixed seed rather than the 'derandomize' setting: derandomize implies no example database, and
    # hypothesis's pytest plugin nests one settings object per invocation of a parametrized test, through
    # all of which a database of None is looked up again, past the recursion limit after about a thousand
    # invocations (tests/test_bad_inputs.py has more). This hook runs before the plugin's, which reads it.
    if os.environ.get("CI") and config.getoption("hypothesis_seed") is None:
        config.option.hypothesis_seed = str(CI_SEED)
