"""Routing attention (Roy, Saffar, Vaswani, Grangier; TACL 2021): the NumPy reference.

One module per step of spec/routing.md, which defines the algorithm (where this code and the spec
disagree, the spec wins and the code is the bug):

- :mod:`.profiles`: the constants of the two profiles, ``"tacl"`` (the authors' TensorFlow code,
  the default) and ``"lucidrains"`` (lucidrains/routing-transformer 1.6.1);
- :mod:`.normalize`: step 1, LayerNorm without affine (tacl) or unit L2 norm (lucidrains);
- :mod:`.similarity`: step 2, S = x̂ μᵀ;
- :mod:`.route`: step 3, the top-W tokens of every centroid;
- :mod:`.cluster_attention`: step 4, dense attention inside every cluster;
- :mod:`.combine`: step 5, the mean over a token's clusters;
- :mod:`.local_attention`: step 6, blocked local attention (the other heads);
- :mod:`.centroids`: step 7, ``CentroidState``, ``assign``, ``init_centroids``, ``update_centroids``;
- :mod:`.commitment`: step 8, the commitment loss;
- :mod:`.attention`: the pipeline, its gradient, and the default C and W.

Everything is computed in float64 and returned as float64 (members and assignments as int64).

**Checks and cores**, as in :mod:`refattn.fsat`: every public function ``f`` of a step module is
``check_f`` (validate, returning the arguments in ``f``'s order, the profile as a
:class:`~refattn.routing.profiles.Profile`), the promotion to float64, and ``f_core`` (compute on
validated arrays of one floating dtype, NumPy or CuPy, with a ``Profile``), plus
:func:`refattn.checks.check_overflow` on the results. :mod:`.indexing` holds the gathers and
scatters through member arrays (``flat_rows``, ``gather``, ``scatter_add``, ``member_counts``).
"""

from .attention import attention, attention_vjp, default_num_clusters, default_window
from .centroids import CentroidState, assign, init_centroids, update_centroids
from .cluster_attention import cluster_attention, cluster_attention_vjp
from .combine import combine, combine_vjp
from .commitment import commitment_loss, commitment_loss_vjp
from .local_attention import local_attention, local_attention_vjp
from .normalize import normalize, normalize_vjp
from .route import route
from .similarity import similarity, similarity_vjp

__all__ = [
    "normalize",
    "normalize_vjp",
    "similarity",
    "similarity_vjp",
    "route",
    "cluster_attention",
    "cluster_attention_vjp",
    "combine",
    "combine_vjp",
    "local_attention",
    "local_attention_vjp",
    "assign",
    "CentroidState",
    "init_centroids",
    "update_centroids",
    "commitment_loss",
    "commitment_loss_vjp",
    "attention",
    "attention_vjp",
    "default_num_clusters",
    "default_window",
]
