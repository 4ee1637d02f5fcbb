"""refattn: the reference implementation, and verified backends, of two sparse attentions.

- :mod:`refattn.fsat`: FSAT, Fourier Sparse Attention for Transformer (Zhuang, Zhang, Tu; ACL 2022).
- :mod:`refattn.routing`: Routing attention (Roy, Saffar, Vaswani, Grangier; TACL 2021).

Both are the NumPy/SciPy reference, written to be read. :mod:`refattn.ops` has the same two
namespaces from the backend chosen by the environment variable ``REFATTN_BACKEND`` (default
``numpy``), which is read and validated here, once; :func:`get_backend` returns any backend by name.
:mod:`refattn.checks` holds the input checks that the reference and the backends share.
"""

from __future__ import annotations

import os

from refattn import fsat, routing
from refattn.backends import (
    DEFAULT_BACKEND,
    Backend,
    BackendUnavailableError,
    Capabilities,
    Strategy,
    UnknownBackendError,
    check_name,
    get_backend,
    registered,
)

__version__ = "0.1.0"

SELECTED_BACKEND: str = check_name(
    os.environ.get("REFATTN_BACKEND", "").strip() or DEFAULT_BACKEND, source="REFATTN_BACKEND"
)
"""The backend behind :mod:`refattn.ops`, from ``REFATTN_BACKEND`` at import time."""

# After SELECTED_BACKEND: refattn.ops reads it. Importing ops imports no backend library (it loads
# the selected backend on its first attribute access), so ``refattn.ops.fsat`` works after a plain
# ``import refattn``.
from refattn import checks, ops  # noqa: E402

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Capabilities",
    "SELECTED_BACKEND",
    "Strategy",
    "UnknownBackendError",
    "checks",
    "fsat",
    "get_backend",
    "ops",
    "registered",
    "routing",
]
