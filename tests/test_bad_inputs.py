"""Every public function of every declared backend, and the torch layers, given one bad argument: a
``TypeError`` or ``ValueError`` whose message names that argument, never another exception, never a result.

One test item per (backend, function, argument, category); hypothesis draws the shapes (B, H, L, D,
Dv, C, W, K), the seed of the valid arguments and where a bad value goes, and each example tries every
variant of the category:

- ``type``: a string, a dict, None (for a required argument), a torch tensor (NumPy reference);
- ``rank``: one axis more, one axis less;
- ``shape``: one axis one longer where another argument (or the axis itself, 2L - 1) fixes its length;
- ``dtype``: integer, complex and bool arrays for floating ones, floating arrays for masks and indices;
- ``range``: integers and numbers outside their range, index arrays with an entry out of range;
- ``finiteness``: NaN, +inf at a drawn position of a floating array or a number.

A backend takes part by being declared in :data:`BACKENDS`: those that run in this process, and
those that need an environment set before their library is imported (Numba's CUDA simulator, CuPy's
CUDA C emulation on NumPy arrays), which run this same file in a child pytest
(:func:`test_backends_declared_for_a_child_process`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import refattn

CHILD = "REFATTN_BAD_INPUTS_BACKEND"  # set in the child process: the one backend it checks


@dataclass(frozen=True)
class Declared:
    """A backend of this test: its arrays are made by ``convert`` from NumPy; ``environment`` must be set
    before its library is imported (then it runs in a child process); ``requires`` its Python modules."""

    convert: str  # "numpy" or "torch"
    requires: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)


BACKENDS = {
    "numpy": Declared("numpy"),
    "torch": Declared("torch", requires=("torch",)),
    "numba_cuda": Declared("numpy", requires=("numba", "numba.cuda"), environment={"NUMBA_ENABLE_CUDASIM": "1"}),
    "cupy": Declared("numpy", requires=("cupy",), environment={"REFATTN_CUDA_EMULATION": "1"}),  # NumPy arrays
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _here(name: str) -> bool:
    """Whether ``name`` is checked in this process: the child's one backend, or those needing no environment."""
    declared = BACKENDS[name]
    if os.environ.get(CHILD):
        return name == os.environ[CHILD]
    return not declared.environment and all(_importable(module) for module in declared.requires)


# ------------------------------------------------------------------------------------------------
# the arguments of every function
# ------------------------------------------------------------------------------------------------

FLOAT, INDEX, MASK, INT, FLAG, REAL, CHOICE, STATE, RNG = (
    "float", "index", "mask", "int", "flag", "real", "choice", "state", "rng")
CATEGORIES = {
    FLOAT: ("type", "rank", "shape", "dtype", "finiteness"),
    INDEX: ("type", "rank", "shape", "dtype", "range"),
    MASK: ("type", "rank", "shape", "dtype"),
    INT: ("type", "range"),
    FLAG: ("type",),
    REAL: ("type", "range", "finiteness"),
    CHOICE: ("type", "range"),
    STATE: ("type",),
    RNG: ("type",),
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    axes: str = ""  # one letter per axis: B H L T(=2L-1) D E(=Dv) C W K; for an INT equal to L: "L"
    low: float | None = None
    high: str | float | None = None  # a number, or a dimension's letter ("L": at most L)
    required: bool = True  # False: omitted from the valid call, given only when it is the one made bad
    positional: bool = True
    nullable: bool = False  # None is a valid value
    any_rank: bool = False  # any rank is valid (normalize works over the last axis of any array)


@dataclass(frozen=True)
class Function:
    namespace: str  # "fsat", "routing"
    name: str
    params: tuple[Param, ...]
    valid: Callable[[Any, np.random.Generator, Any], dict[str, Any]]  # (dims, rng, backend) -> values
    only: tuple[str, ...] = ()  # the backends that have it beyond the common interface (empty: every backend)


def _p(name: str, kind: str, axes: str = "", **kw: Any) -> Param:
    return Param(name, kind, axes, **kw)


def _kw(name: str, kind: str, axes: str = "", **kw: Any) -> Param:
    return Param(name, kind, axes, positional=False, **kw)


def _normal(rng: np.random.Generator, d: Any, axes: str) -> np.ndarray:
    return rng.standard_normal(tuple(d.size(axis) for axis in axes))


def _mask(d: Any) -> np.ndarray:
    return np.zeros((d.B, d.L), dtype=bool)


def _offsets(rng: np.random.Generator, d: Any) -> np.ndarray:
    return refattn.fsat.select(rng.standard_normal((d.B, d.H, 2 * d.L - 1)), d.K)


def _members(rng: np.random.Generator, d: Any) -> np.ndarray:
    return refattn.routing.route(rng.standard_normal((d.B, d.H, d.L, d.C)), d.W)


def _arrays(rng: np.random.Generator, d: Any, **axes: str) -> dict[str, np.ndarray]:
    return {name: _normal(rng, d, spec) for name, spec in axes.items()}


def _centroid_statistics(d: Any, rng: np.random.Generator, backend: Any) -> dict[str, Any]:
    """Valid arguments of apply_centroid_statistics: a state and the statistics of a batch."""
    import torch

    state = backend.routing.init_centroids(d.H, d.C, d.D, rng=np.random.default_rng(0))
    q_hat = torch.from_numpy(_normal(rng, d, "BHLD"))
    return {"state": state, "statistics": backend.routing.centroid_statistics(state, q_hat), "profile": "tacl",
            "decay": 0.9}


MASK_PARAM = _kw("key_padding_mask", MASK, "BL", required=False)
CAUSAL = _kw("causal", FLAG)
PROFILE_PARAM = _kw("profile", CHOICE)
QKV = (_p("q", FLOAT, "BHLD"), _p("k", FLOAT, "BHLD"), _p("v", FLOAT, "BHLE"))

FUNCTIONS = (
    Function("fsat", "pair_counts", (_p("length", INT, "L", low=1), _p("key_padding_mask", MASK, "BL", required=False)),
             lambda d, rng, b: {"length": d.L, "key_padding_mask": _mask(d)}),
    Function("fsat", "cross", (_p("a", FLOAT, "BHLD"), _p("b", FLOAT, "BHLD"), MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, a="BHLD", b="BHLD"), "key_padding_mask": _mask(d)}),
    Function("fsat", "cross_vjp", (_p("a", FLOAT, "BHLD"), _p("b", FLOAT, "BHLD"), _p("dc", FLOAT, "BHTD"), MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, a="BHLD", b="BHLD", dc="BHTD"), "key_padding_mask": _mask(d)}),
    Function("fsat", "estimate", (_p("c", FLOAT, "BHTD"), _p("w", FLOAT, "HD"), MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, c="BHTD", w="HD"), "key_padding_mask": _mask(d)}),
    Function("fsat", "estimate_vjp", (_p("c", FLOAT, "BHTD"), _p("w", FLOAT, "HD"), _p("ds", FLOAT, "BHT"), MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, c="BHTD", w="HD", ds="BHT"), "key_padding_mask": _mask(d)}),
    Function("fsat", "select", (_p("s", FLOAT, "BHT"), _p("top_k", INT, low=1), CAUSAL,
                                _kw("noise", FLOAT, "BHT", required=False)),
             lambda d, rng, b: {**_arrays(rng, d, s="BHT", noise="BHT"), "top_k": d.K, "causal": False}),
    Function("fsat", "sparse_attention", (*QKV, _p("offsets", INDEX, "BHK"), _p("bias", FLOAT, "BHK", required=False),
                                          CAUSAL, MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", bias="BHK"),
                                "offsets": _offsets(rng, d), "causal": False, "key_padding_mask": _mask(d)}),
    Function("fsat", "sparse_attention_vjp", (*QKV, _p("offsets", INDEX, "BHK"),
                                              _p("bias", FLOAT, "BHK", nullable=True), _p("dout", FLOAT, "BHLE"),
                                              _kw("dlse", FLOAT, "BHL", required=False), CAUSAL, MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", bias="BHK", dout="BHLE", dlse="BHL"),
                                "offsets": _offsets(rng, d), "causal": False, "key_padding_mask": _mask(d)}),
    Function("fsat", "attention", (*QKV, _p("w", FLOAT, "HD"), _p("top_k", INT, low=1), CAUSAL, MASK_PARAM,
                                   _kw("noise", FLOAT, "BHT", required=False)),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", w="HD", noise="BHT"),
                                "top_k": d.K, "causal": False, "key_padding_mask": _mask(d)}),
    Function("fsat", "attention_vjp", (*QKV, _p("w", FLOAT, "HD"), _p("top_k", INT, low=1), _p("dout", FLOAT, "BHLE"),
                                       CAUSAL, MASK_PARAM, _kw("noise", FLOAT, "BHT", required=False)),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", w="HD", dout="BHLE", noise="BHT"),
                                "top_k": d.K, "causal": False, "key_padding_mask": _mask(d)}),
    Function("routing", "normalize", (_p("x", FLOAT, "BHLD", any_rank=True), PROFILE_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, x="BHLD"), "profile": "tacl"}),
    Function("routing", "normalize_vjp", (_p("x", FLOAT, "BHLD"), _p("dx_hat", FLOAT, "BHLD"), PROFILE_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, x="BHLD", dx_hat="BHLD"), "profile": "tacl"}),
    Function("routing", "similarity", (_p("x_hat", FLOAT, "BHLD"), _p("centroids", FLOAT, "HCD")),
             lambda d, rng, b: _arrays(rng, d, x_hat="BHLD", centroids="HCD")),
    Function("routing", "similarity_vjp", (_p("x_hat", FLOAT, "BHLD"), _p("centroids", FLOAT, "HCD"),
                                           _p("ds", FLOAT, "BHLC")),
             lambda d, rng, b: _arrays(rng, d, x_hat="BHLD", centroids="HCD", ds="BHLC")),
    Function("routing", "route", (_p("similarities", FLOAT, "BHLC"), _p("window", INT, low=1, high="L"), MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, similarities="BHLC"), "window": d.W, "key_padding_mask": _mask(d)}),
    Function("routing", "cluster_attention", (*QKV, _p("q_members", INDEX, "BHCW"), _p("k_members", INDEX, "BHCW"),
                                              CAUSAL, _kw("shared_qk", FLAG), PROFILE_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE"), "q_members": _members(rng, d),
                                "k_members": _members(rng, d), "causal": False, "shared_qk": False, "profile": "tacl"}),
    Function("routing", "cluster_attention_vjp", (*QKV, _p("q_members", INDEX, "BHCW"), _p("k_members", INDEX, "BHCW"),
                                                  _p("do", FLOAT, "BHCWE"), CAUSAL, _kw("shared_qk", FLAG),
                                                  PROFILE_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", do="BHCWE"),
                                "q_members": _members(rng, d), "k_members": _members(rng, d), "causal": False,
                                "shared_qk": False, "profile": "tacl"}),
    Function("routing", "combine", (_p("o", FLOAT, "BHCWE"), _p("q_members", INDEX, "BHCW"),
                                    _p("length", INT, "L", low=1), PROFILE_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, o="BHCWE"), "q_members": _members(rng, d), "length": d.L,
                                "profile": "tacl"}),
    Function("routing", "combine_vjp", (_p("q_members", INDEX, "BHCW"), _p("dout", FLOAT, "BHLE"), PROFILE_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, dout="BHLE"), "q_members": _members(rng, d), "profile": "tacl"}),
    Function("routing", "local_attention", (*QKV, _p("block", INT, low=1), CAUSAL, MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE"), "block": d.W, "causal": False,
                                "key_padding_mask": _mask(d)}),
    Function("routing", "local_attention_vjp", (*QKV, _p("block", INT, low=1), _p("dout", FLOAT, "BHLE"), CAUSAL,
                                                MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", dout="BHLE"), "block": d.W,
                                "causal": False, "key_padding_mask": _mask(d)}),
    Function("routing", "assign", (_p("x_hat", FLOAT, "BHLD"), _p("centroids", FLOAT, "HCD"), MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, x_hat="BHLD", centroids="HCD"), "key_padding_mask": _mask(d)}),
    Function("routing", "init_centroids", (_p("num_heads", INT, low=1), _p("num_clusters", INT, low=1),
                                           _p("dim", INT, low=1), _kw("rng", RNG), PROFILE_PARAM),
             lambda d, rng, b: {"num_heads": d.H, "num_clusters": d.C, "dim": d.D,
                                "rng": np.random.default_rng(int(rng.integers(2**31))), "profile": "tacl"}),
    Function("routing", "update_centroids", (_p("state", STATE), _p("q_hat", FLOAT, "BHLD"),
                                             _p("k_hat", FLOAT, "BHLD", required=False), PROFILE_PARAM, MASK_PARAM,
                                             _kw("decay", REAL, low=0.0, high=1.0)),
             lambda d, rng, b: {"state": b.routing.init_centroids(d.H, d.C, d.D, rng=np.random.default_rng(0)),
                                **_arrays(rng, d, q_hat="BHLD", k_hat="BHLD"), "profile": "tacl",
                                "key_padding_mask": _mask(d), "decay": 0.9}),
    Function("routing", "commitment_loss", (_p("x_hat", FLOAT, "BHLD"), _p("centroids", FLOAT, "HCD"),
                                            _kw("beta", REAL, low=0.0), MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, x_hat="BHLD", centroids="HCD"), "beta": 1e-4,
                                "key_padding_mask": _mask(d)}),
    Function("routing", "commitment_loss_vjp", (_p("x_hat", FLOAT, "BHLD"), _p("centroids", FLOAT, "HCD"),
                                                _p("dloss", REAL), _kw("beta", REAL, low=0.0), MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, x_hat="BHLD", centroids="HCD"), "dloss": 1.0, "beta": 1e-4,
                                "key_padding_mask": _mask(d)}),
    Function("routing", "attention", (*QKV, _p("centroids", FLOAT, "HCD"), _kw("window", INT, low=1, high="L"),
                                      CAUSAL, _kw("shared_qk", FLAG), PROFILE_PARAM, MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", centroids="HCD"), "window": d.W,
                                "causal": False, "shared_qk": False, "profile": "tacl", "key_padding_mask": _mask(d)}),
    Function("routing", "attention_vjp", (*QKV, _p("centroids", FLOAT, "HCD"), _p("dout", FLOAT, "BHLE"),
                                          _kw("window", INT, low=1, high="L"), CAUSAL, _kw("shared_qk", FLAG),
                                          PROFILE_PARAM, MASK_PARAM),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", centroids="HCD", dout="BHLE"),
                                "window": d.W, "causal": False, "shared_qk": False, "profile": "tacl",
                                "key_padding_mask": _mask(d)}),
    Function("fsat", "attention_with_offsets", (*QKV, _p("w", FLOAT, "HD"), _p("top_k", INT, low=1), CAUSAL,
                                                MASK_PARAM, _kw("noise", FLOAT, "BHT", required=False)),
             lambda d, rng, b: {**_arrays(rng, d, q="BHLD", k="BHLD", v="BHLE", w="HD", noise="BHT"),
                                "top_k": d.K, "causal": False, "key_padding_mask": _mask(d)}, only=("torch",)),
    Function("fsat", "candidate_order", (_p("length", INT, low=1), CAUSAL),
             lambda d, rng, b: {"length": d.L, "causal": False}, only=("torch",)),
    Function("routing", "centroid_statistics", (_p("state", STATE), _p("q_hat", FLOAT, "BHLD"),
                                                _p("k_hat", FLOAT, "BHLD", required=False), MASK_PARAM),
             lambda d, rng, b: {"state": b.routing.init_centroids(d.H, d.C, d.D, rng=np.random.default_rng(0)),
                                **_arrays(rng, d, q_hat="BHLD", k_hat="BHLD"), "key_padding_mask": _mask(d)},
             only=("torch",)),
    Function("routing", "apply_centroid_statistics", (_p("state", STATE), _p("statistics", STATE), PROFILE_PARAM,
                                                      _kw("decay", REAL, low=0.0, high=1.0)),
             lambda d, rng, b: _centroid_statistics(d, rng, b), only=("torch",)),
    Function("routing", "default_num_clusters", (_p("length", INT, low=1),), lambda d, rng, b: {"length": d.L}),
    Function("routing", "default_window", (_p("length", INT, low=1), _p("num_clusters", INT, low=1)),
             lambda d, rng, b: {"length": d.L, "num_clusters": d.C}),
)


@dataclass(frozen=True)
class Dims:
    B: int
    H: int
    L: int
    D: int
    E: int
    C: int
    W: int
    K: int

    def size(self, axis: str) -> int:
        return 2 * self.L - 1 if axis == "T" else getattr(self, axis)


@st.composite
def dims(draw: Any) -> Dims:
    length = draw(st.integers(3, 6))
    return Dims(B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), L=length, D=draw(st.integers(1, 3)),
                E=draw(st.integers(1, 3)), C=draw(st.integers(1, 2)), W=draw(st.integers(1, length)),
                K=draw(st.integers(1, 3)))


# ------------------------------------------------------------------------------------------------
# bad values
# ------------------------------------------------------------------------------------------------


def _linked(function: Function, param: Param, present: set[str]) -> dict[str, set[str]]:
    """For each axis of ``param`` whose length something else fixes: the arguments an error may name."""
    letters = {"T": "L"}  # 2L - 1 and L are one dimension
    sharing: dict[str, set[str]] = {}
    for other in function.params:
        if other.name in present and other.kind in (FLOAT, INDEX, MASK, INT):
            for axis in other.axes:
                sharing.setdefault(letters.get(axis, axis), set()).add(other.name)
    linked = {}
    for axis in param.axes:
        names = sharing.get(letters.get(axis, axis), set())
        repeats_an_entry = param.kind == INDEX and axis == param.axes[-1]  # entries of a row must be distinct
        if len(names) > 1 or axis == "T" or repeats_an_entry:
            linked[axis] = names | {param.name}
    return linked


def _variants(function: Function, param: Param, category: str, value: Any, d: Dims, data: Any,
              backend_name: str, present: set[str]) -> list[tuple[str, Any, set[str]]]:
    """(label, bad value, the names an error may give) for one category of one argument."""
    name = {param.name}
    if category == "type":
        bad: list[tuple[str, Any, set[str]]] = [("a string", "abc", name), ("a dict", {"x": 1}, name)]
        if param.required and not param.nullable and param.kind != INT:
            bad.append(("None", None, name))
        if param.kind == INT:
            bad += [("a float", 2.0, name), ("a numeric string", "2", name), ("a bool", True, name)]
        if param.kind == FLAG:
            bad += [("the string 'yes'", "yes", name), ("the integer 1", 1, name)]
        if param.kind == REAL:
            bad += [("a numeric string", "0.5", name), ("a bool", True, name)]
        if param.kind == CHOICE:
            bad += [("an integer", 3, name)]
        if param.kind in (FLOAT, INDEX, MASK) and backend_name == "numpy" and _importable("torch"):
            import torch

            bad.append(("a torch tensor", torch.from_numpy(np.asarray(value)), name))
        return bad
    if category == "rank":
        return [("one axis more", value[None], name), ("one axis less", value[0], name)]
    if category == "shape":
        linked = _linked(function, param, present)
        axis = data.draw(st.sampled_from(sorted(linked)), label="axis")
        position = param.axes.index(axis)
        longer = np.concatenate([value, np.take(value, [-1], axis=position)], axis=position)
        return [(f"axis {axis} one longer", longer, linked[axis])]
    if category == "dtype":
        if param.kind == FLOAT:
            return [("int64", value.astype(np.int64), name), ("complex128", value.astype(np.complex128), name),
                    ("bool", value > 0, name)]
        return [("float64", value.astype(np.float64), name)]
    if category == "range":
        if param.kind == INT:
            bad = [(f"{param.low - 1:g}", int(param.low - 1), name)]
            if param.high is not None:
                high = d.size(param.high) if isinstance(param.high, str) else param.high
                bad.append((f"{high + 1}", int(high + 1), name))
            return bad
        if param.kind == REAL:
            bad = []
            if param.low is not None:
                bad.append((f"{param.low - 0.5:g}", param.low - 0.5, name))
            if param.high is not None:
                bad.append((f"{param.high + 0.5:g}", param.high + 0.5, name))
            return bad
        if param.kind == CHOICE:
            return [("'bogus'", "bogus", name)]
        flat = value.copy().reshape(-1)
        flat[data.draw(st.integers(0, flat.size - 1), label="entry")] = d.L if param.name != "offsets" else 2 * d.L
        return [("an entry out of range", flat.reshape(value.shape), name)]
    if category == "finiteness":
        if param.kind == REAL:
            return [("nan", math.nan, name), ("inf", math.inf, name)]
        bad = []
        for label, number in (("nan", np.nan), ("+inf", np.inf)):
            spoiled = value.copy().reshape(-1)
            spoiled[data.draw(st.integers(0, spoiled.size - 1), label="entry")] = number
            bad.append((f"{label} at one entry", spoiled.reshape(value.shape), name))
        return bad
    raise AssertionError(category)


def _eligible(function: Function, param: Param, category: str) -> bool:
    if category == "rank" and param.any_rank:
        return False
    if category == "range" and param.kind == REAL and param.low is None and param.high is None:
        return False
    if category == "shape":
        present = {p.name for p in function.params if p.required} | {param.name}
        return bool(_linked(function, param, present))
    return True


FUNCTIONS_BY_NAME = {f"{function.namespace}.{function.name}": function for function in FUNCTIONS}
CASES = [(f"{function.namespace}.{function.name}", param.name, category) for function in FUNCTIONS
         for param in function.params for category in CATEGORIES[param.kind] if _eligible(function, param, category)]


def _has(backend_name: str, function_name: str) -> bool:
    only = FUNCTIONS_BY_NAME[function_name].only
    return not only or backend_name in only


@pytest.mark.parametrize("backend_name", [name for name in BACKENDS if _here(name)])
def test_every_public_function_is_declared(backend_name: str) -> None:
    """A new public function of a backend is a case here, not forgotten (classes are the results' types)."""
    backend = refattn.get_backend(backend_name)
    public = {f"{namespace}.{name}" for namespace in ("fsat", "routing")
              for name in getattr(backend, namespace).__all__
              if callable(getattr(getattr(backend, namespace), name)) and not name[0].isupper()}
    assert public == {name for name in FUNCTIONS_BY_NAME if _has(backend_name, name)}


def _to_backend(value: Any, declared: Declared) -> Any:
    if declared.convert == "torch" and isinstance(value, np.ndarray):
        import torch

        return torch.from_numpy(value)
    return value


def _names_in(message: str, names: set[str]) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message) for name in names)


def expect_named_error(call: Callable[[], Any], names: set[str], what: str) -> None:
    """``call()`` raises TypeError or ValueError naming one of ``names``."""
    try:
        result = call()
    except (TypeError, ValueError) as error:
        assert _names_in(str(error), names), f"{what}: {type(error).__name__} names none of {sorted(names)}: {error}"
    except Exception as error:  # noqa: BLE001 - any other type is the failure reported
        pytest.fail(f"{what}: {type(error).__name__} instead of TypeError/ValueError: {error}")
    else:
        pytest.fail(f"{what}: accepted silently, returned {type(result).__name__}")


SETTINGS = settings(max_examples=3, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize(
    ("backend_name", "function_name", "param_name", "category"),
    [pytest.param(name, *case, id="-".join((name, *case)))
     for name in BACKENDS if _here(name) for case in CASES if _has(name, case[0])],
)
@SETTINGS
@given(d=dims(), seed=st.integers(0, 2**16), data=st.data())
def test_a_bad_argument_gets_an_error_naming_it(backend_name: str, function_name: str, param_name: str,
                                                category: str, d: Dims, seed: int, data: Any) -> None:
    declared = BACKENDS[backend_name]
    backend = refattn.get_backend(backend_name)
    function = FUNCTIONS_BY_NAME[function_name]
    param = next(p for p in function.params if p.name == param_name)
    values = function.valid(d, np.random.default_rng(seed), backend)
    present = {p.name for p in function.params if p.required} | {param.name}
    fn = getattr(getattr(backend, function.namespace), function.name)
    for label, bad, names in _variants(function, param, category, values[param.name], d, data, backend_name,
                                       present):
        args, kwargs = [], {}
        for p in function.params:
            if p.name in present:
                value = _to_backend(bad if p.name == param.name else values[p.name], declared)
                if p.positional:
                    args.append(value)
                else:
                    kwargs[p.name] = value
        expect_named_error(lambda args=args, kwargs=kwargs: fn(*args, **kwargs), names,
                           f"{backend_name} {function_name}({param.name}={label}), {d}")


def test_backends_declared_for_a_child_process() -> None:
    """Each backend that needs its environment before its library is imported runs this file in a child pytest."""
    if os.environ.get(CHILD):
        pytest.skip("this is the child process")
    ran = []
    for name, declared in BACKENDS.items():
        if not declared.environment:
            continue
        missing = [module for module in declared.requires if not _importable(module)]
        if missing:
            print(f"{name}: not checked, {', '.join(missing)} cannot be imported")
            continue
        environment = {**os.environ, **declared.environment, CHILD: name}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                 str(Path(__file__)), "-k", "test_a_bad_argument_gets_an_error_naming_it or "
                                 "test_every_public_function_is_declared"],
                                capture_output=True, text=True, env=environment, timeout=600)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
        ran.append(name)
        print(f"{name}: {result.stdout.strip().splitlines()[-1]}")
    assert ran or not any(declared.environment for declared in BACKENDS.values())


# ------------------------------------------------------------------------------------------------
# the torch layers: constructor arguments, then forward's
# ------------------------------------------------------------------------------------------------

GENERATOR = "generator"
CATEGORIES[GENERATOR] = ("type",)

LAYERS: dict[str, tuple[dict[str, Any], tuple[Param, ...]]] = {
    "FSATAttention": ({"dim": 4, "heads": 2, "top_k": 2}, (
        _kw("dim", INT, low=1), _kw("heads", INT, low=1), _kw("top_k", INT, low=1), _kw("causal", FLAG),
        _kw("cross_dim", INT, low=1, required=False), _kw("dropout", REAL, low=0.0, high=1.0),
        _kw("generator", GENERATOR, required=False), _kw("noise_scale", REAL, low=0.0),
        _kw("noise_schedule", CHOICE), _kw("noise_final", REAL, low=0.0), _kw("noise_steps", INT, low=1))),
    "RoutingAttention": ({"dim": 4, "heads": 2, "num_clusters": 2}, (
        _kw("dim", INT, low=1), _kw("heads", INT, low=1), _kw("num_clusters", INT, low=1),
        _kw("window", INT, low=1, required=False), _kw("causal", FLAG), _kw("shared_qk", FLAG),
        _kw("local_heads", INT, low=0, high=1), _kw("local_block", INT, low=1), _kw("profile", CHOICE),
        _kw("max_seq_len", INT, low=1, required=False), _kw("dim_head", INT, low=1, required=False),
        _kw("decay", REAL, low=0.0, high=1.0), _kw("commitment", REAL, low=0.0), _kw("bias", FLAG),
        _kw("generator", GENERATOR, required=False), _kw("sync_centroids", FLAG))),
}
FORWARD = {
    "FSATAttention": (_p("x", FLOAT, "BLM"), _kw("key_padding_mask", MASK, "BL", required=False)),
    "RoutingAttention": (_p("x", FLOAT, "BLM"), _kw("key_padding_mask", MASK, "BL", required=False),
                         _kw("return_loss", FLAG, required=False)),
}
NOT_DECLARED = {"process_group"}  # RoutingAttention's torch.distributed group: checked by torch.distributed
LAYER_CASES = [(layer, param.name, category) for layer, (_, params) in LAYERS.items() for param in params
               for category in CATEGORIES[param.kind]
               if not (category == "range" and param.kind == REAL and param.low is None)]
FORWARD_CASES = [(layer, f"forward.{param.name}", category) for layer in LAYERS for param in FORWARD[layer]
                 for category in CATEGORIES[param.kind]]
LAYER_FUNCTION = Function("layer", "forward", FORWARD["RoutingAttention"], lambda d, rng, b: {})


@pytest.mark.skipif(not _here("torch"), reason="the torch layers: torch is not installed, or a child process")
@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_argument_is_declared(layer: str) -> None:
    """A new option or forward argument of a layer is a case above, not forgotten."""
    import inspect

    from refattn.backends import torch as torch_backend

    cls = getattr(torch_backend, layer)
    options = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    forward = [name for name in inspect.signature(cls.forward).parameters if name != "self"]
    assert sorted(set(options) - NOT_DECLARED) == sorted(param.name for param in LAYERS[layer][1])
    assert forward == [param.name for param in FORWARD[layer]]


def _layer_variants(param: Param, category: str, d: Dims, data: Any) -> list[tuple[str, Any, set[str]]]:
    if param.kind == GENERATOR:
        return [("a string", "abc", {param.name}), ("a seed", 3, {param.name})]
    return _variants(LAYER_FUNCTION, param, category, None, d, data, "torch", set())


@pytest.mark.skipif(not _here("torch"), reason="the torch layers: torch is not installed, or a child process")
@pytest.mark.parametrize(("layer", "param_name", "category"),
                         [pytest.param(*case, id="-".join(case))
                          for case in LAYER_CASES + FORWARD_CASES])
@SETTINGS
@given(d=dims(), seed=st.integers(0, 2**16), data=st.data())
def test_a_bad_layer_argument_gets_an_error_naming_it(layer: str, param_name: str, category: str, d: Dims, seed: int,
                                                      data: Any) -> None:
    import torch

    from refattn.backends import torch as torch_backend

    cls = getattr(torch_backend, layer)
    valid, params = LAYERS[layer]
    if not param_name.startswith("forward."):
        param = next(p for p in params if p.name == param_name)
        for label, bad, names in _layer_variants(param, category, d, data):
            kwargs = {**valid, param.name: bad}
            expect_named_error(lambda kwargs=kwargs: cls(**kwargs), names, f"{layer}({param.name}={label})")
        return
    param = next(p for p in FORWARD[layer] if p.name == param_name.removeprefix("forward."))
    torch.manual_seed(seed)
    module = cls(**valid)
    dim = valid["dim"]
    rng = np.random.default_rng(seed)
    values = {"x": rng.standard_normal((d.B, d.L, dim)).astype(np.float32), "key_padding_mask": _mask(d)}
    linked = {"M": {"x"}, "B": {"x", "key_padding_mask"}, "L": {"x", "key_padding_mask"}}
    if category == "shape":
        axis = data.draw(st.sampled_from("BL" if param.name == "key_padding_mask" else "M"), label="axis")
        value = values[param.name]
        position = param.axes.index(axis)
        bad_values = [(f"axis {axis} one longer",
                       np.concatenate([value, np.take(value, [-1], axis=position)], axis=position), linked[axis])]
    else:
        bad_values = _variants(LAYER_FUNCTION, param, category, values.get(param.name), d, data, "torch", set())
    for label, bad, names in bad_values:
        arguments = {**values, param.name: bad}
        tensors = {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                   for key, value in arguments.items()}
        x = tensors.pop("x")
        expect_named_error(lambda x=x, tensors=tensors: module(x, **tensors), names,
                           f"{layer}.forward({param.name}={label}), B={d.B} L={d.L}")
