"""Every backend mirrors the reference's layout (refattn.backends.layout): its ``fsat`` and ``routing`` export
the reference's names, each the object of its step module named as the reference's."""

from __future__ import annotations

import importlib
import importlib.util
import types

import pytest

import refattn.fsat
import refattn.routing
from refattn.backends.layout import export_steps

BACKENDS = {"torch": "torch", "numba_cuda": "numba", "cupy": "cupy"}


@pytest.mark.parametrize("namespace", ["fsat", "routing"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_backend_exports_the_reference_names_from_the_step_modules_of_the_same_names(backend, namespace):
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.skip(f"{BACKENDS[backend]} is not installed")
    reference = getattr(refattn, namespace)
    package = importlib.import_module(f"refattn.backends.{backend}.{namespace}")
    assert package.__all__[: len(reference.__all__)] == reference.__all__
    for name in reference.__all__:
        step = getattr(reference, name).__module__.rpartition(".")[2]
        assert getattr(package, name) is getattr(importlib.import_module(f"{package.__name__}.{step}"), name)
        assert getattr(package, name).__name__ == getattr(reference, name).__name__
    for name in package.__all__:  # additions too
        assert hasattr(package, name), name


def test_a_missing_step_name_fails_at_import_naming_it():
    def extra_step():
        pass

    extra_step.__module__ = "refattn.fsat.cross"  # as if the reference's cross module had defined it
    reference = types.SimpleNamespace(__name__="refattn.fsat", __all__=["extra_step"], extra_step=extra_step)
    with pytest.raises(ImportError, match=r"^refattn\.backends\.numba_cuda\.fsat\.cross has no extra_step, which "
                                          r"refattn\.fsat\.cross defines$"):
        export_steps(reference, {"__name__": "refattn.backends.numba_cuda.fsat"})
