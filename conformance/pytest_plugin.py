"""pytest options of the conformance suite, registered for every pytest run as the plugin ``refattn``.

Run the suite with ``pytest --pyargs refattn.conformance``.

The backend comes from ``--refattn-backend NAME`` or the environment variable
``REFATTN_CONFORMANCE_BACKEND`` (default: the reference, ``numpy``); ``--refattn-quick`` keeps the
smallest shapes.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("refattn conformance")
    group.addoption("--refattn-backend", default=os.environ.get("REFATTN_CONFORMANCE_BACKEND", "numpy"),
                    help="backend to check (default: $REFATTN_CONFORMANCE_BACKEND or numpy)")
    group.addoption("--refattn-quick", action="store_true", help="the smallest shapes only")
