"""The backend selected at import time (``REFATTN_BACKEND``), with the reference's namespaces.

``refattn.ops.fsat.attention(...)`` and ``refattn.ops.routing.attention(...)`` run on that
backend. Its library (torch, CuPy, Numba) is imported on the first attribute access here, not when
``refattn`` is imported.
"""

from __future__ import annotations

from typing import Any

import refattn


def __getattr__(name: str) -> Any:
    if name in {"fsat", "routing", "name", "capabilities", "from_numpy", "to_numpy", "status", "synchronize"}:
        return getattr(refattn.get_backend(refattn.SELECTED_BACKEND), name)
    raise AttributeError(f"module 'refattn.ops' has no attribute {name!r}")
