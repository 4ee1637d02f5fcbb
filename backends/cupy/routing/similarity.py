"""Routing step 2 on CuPy arrays: :mod:`refattn.routing.similarity` in the compute dtype (cuBLAS GEMMs)."""

from __future__ import annotations

import importlib

from ..device import Overflow, mirror

reference = importlib.import_module("refattn.routing.similarity")

similarity = mirror(reference.similarity, reference.check_similarity, reference.similarity_core,
                    overflow=[Overflow("the similarity", ("x_hat", "centroids"))])

similarity_vjp = mirror(reference.similarity_vjp, reference.check_similarity_vjp, reference.similarity_vjp_core,
                        overflow=[Overflow("the gradient of the similarity", ("ds", "centroids")),
                                  Overflow("the gradient of the similarity", ("ds", "x_hat"))])
