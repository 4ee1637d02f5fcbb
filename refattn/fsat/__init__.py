"""FSAT (Fourier Sparse Attention for Transformer): the NumPy/SciPy reference.

One module per step of spec/fsat.md, which defines the algorithm (where this code and the spec
disagree, the spec wins and the code is the bug):

- :mod:`.cross`: step 1, the FFT hidden-state cross pooled by offset (``pair_counts``, ``cross``);
- :mod:`.estimate`: step 2, one score per offset (``estimate``);
- :mod:`.select`: step 2, the dominant diagonals (``select``);
- :mod:`.sparse_attention`: step 3, attention on the selected diagonals with the score as bias;
- :mod:`.attention`: the whole pipeline and its gradient with the truncation of step 4.

Everything is computed in float64 and returned as float64 (offsets as int64).

**Checks and cores.** Every public function ``f`` of a step module is three things, each public:

- ``check_f(<f's arguments>)`` validates every argument (:mod:`refattn.checks`) and returns them,
  in the order of ``f``'s signature: arrays unchanged (no copy, no cast), integers as ``int``,
  flags as ``bool``, masks and index arrays validated (index arrays as int64);
- ``f_core(<the same arguments>)`` computes on validated arguments and checks nothing: its floating
  arrays share one dtype, which it computes and returns in, and its namespace is its inputs'
  (NumPy, or CuPy with ``cupyx.scipy.fft``); composite cores (``attention_core``, ``plan_core``)
  call the step cores, so a call validates its inputs once;
- ``f`` itself is ``check_f``, the promotion to float64, ``f_core`` and, on the results,
  :func:`refattn.checks.check_overflow` (a product that overflows float64 raises ``ValueError``
  naming the user's arguments; composite cores check each intermediate result the same way).

A backend runs the reference's code on its own arrays by calling ``check_f`` and ``f_core`` with
its compute dtype (docs/checks-and-cores.md).
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
