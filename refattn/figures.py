"""The plots of ``refattn bench`` and ``refattn quality``: matplotlib without a display, each figure saved and
closed the same way. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files, no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int) -> Path:
    """``fig`` laid out tightly, written to ``path`` and closed; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
