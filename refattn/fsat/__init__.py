"""FSAT (Fourier Sparse Attention for Transformer): the NumPy/SciPy reference.

One module per step of spec/fsat.md, which defines the algorithm (where this code and the spec
disagree, the spec wins and the code is the bug):

- :mod:`.cross`: step 1, the FFT hidden-state cross pooled by offset (``pair_counts``, ``cross``);
- :mod:`.estimate`: step 2, one score per offset (``estimate``);
- :mod:`.select`: step 2, the dominant diagonals (``select``);
- :mod:`.sparse_attention`: step 3, attention on the selected diagonals with the score as bias;
- :mod:`.attention`: the whole pipeline and its gradient with the truncation of step 4.

Everything is computed in float64 and returned as float64 (offsets as int64).
"""

from .attention import FSATGrads, attention, attention_vjp
from .cross import cross, cross_vjp, pair_counts
from .estimate import estimate, estimate_vjp
from .select import select
from .sparse_attention import sparse_attention, sparse_attention_vjp

__all__ = [
    "pair_counts",
    "cross",
    "cross_vjp",
    "estimate",
    "estimate_vjp",
    "select",
    "sparse_attention",
    "sparse_attention_vjp",
    "attention",
    "attention_vjp",
    "FSATGrads",
]
