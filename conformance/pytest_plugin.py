"""pytest options of the conformance suite, registered for every pytest run as the plugin ``refattn``.

Run the suite with ``pytest --pyargs refattn.conformance``.

The backend comes from ``--refattn-backend NAME`` or the environment variable
``REFATTN_CONFORMANCE_BACKEND`` (default: the reference, ``numpy``); ``--refattn-quick`` keeps the
smallest shapes and a pairwise covering of the flags.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("refattn conformance")
    group.addoption("--refattn-backend", default=os.environ.get("REFATTN_CONFORMANCE_BACKEND", "numpy"),
                    help="backend to check (default: $REFATTN_CONFORMANCE_BACKEND or numpy)")
    group.addoption("--refattn-quick", action="store_true",
                    help="the smallest shapes and a pairwise covering of the flags")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the backend under test, and every REFATTN_* variable, so that a typo is visible."""
    if not any("conformance" in str(argument) for argument in config.args):
        return []
    variables = ", ".join(f"{key}={value}" for key, value in sorted(os.environ.items()) if key.startswith("REFATTN_"))
    return [f"refattn conformance backend: {config.getoption('--refattn-backend')}"
            + (f" ({variables})" if variables else "")]
