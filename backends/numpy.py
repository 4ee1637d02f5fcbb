"""The NumPy reference as a backend: ``refattn.fsat`` and ``refattn.routing`` themselves."""

from __future__ import annotations

import numpy as np

from refattn.backends import Backend, Capabilities


def _from_numpy(array: np.ndarray, dtype: str | None = None, device: str = "cpu") -> np.ndarray:
    return array if dtype is None else np.asarray(array, dtype=dtype)


def backend() -> Backend:
    """The reference backend: computes in float64 on the CPU, whatever its inputs' dtype."""
    from refattn import fsat, routing

    return Backend(
        name="numpy",
        fsat=fsat,
        routing=routing,
        capabilities=Capabilities(dtypes=("float64",), devices=("cpu",), gradients=True),
        from_numpy=_from_numpy,
        to_numpy=np.asarray,
        status=f"NumPy {np.__version__} reference, float64 on the CPU",
    )
