"""Every backend mirrors the reference's layout: its ``fsat`` and ``routing`` packages hold one module per step
with the reference's module names, and export the reference's public names, each from the module of the same
name as the reference's (``refattn.fsat.cross.cross`` is ``<backend>.fsat.cross.cross``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


def export_steps(reference: ModuleType, namespace: dict[str, Any]) -> list[str]:
    """Put every name of ``reference.__all__`` into a backend package's ``namespace`` (its ``globals()``), taken
    from the backend's step module named as the reference's; returns those names, for ``__all__``. A backend
    that lacks a step module or one of its names fails at import, naming it."""
    package = namespace["__name__"]
    for name in reference.__all__:
        step = getattr(reference, name).__module__.rpartition(".")[2]
        module = importlib.import_module(f"{package}.{step}")
        if not hasattr(module, name):
            raise ImportError(f"{module.__name__} has no {name}, which {reference.__name__}.{step} defines")
        namespace[name] = getattr(module, name)
    return list(reference.__all__)
