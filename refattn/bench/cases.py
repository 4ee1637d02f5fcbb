"""Benchmark cases: one zero-argument timed callable per (backend, algorithm, direction, dtype, shape).

A case is built by :func:`build_case`, which raises :class:`Unsupported` (with the reason) when the
backend cannot run it here; the suite turns that into a skip and the sweep into a "—" cell.

Backends are the registry's (``numpy``, ``torch``, ``cupy``, ``numba_cuda``, third-party ones) plus
the peer ``lucidrains`` (``routing_transformer.KmeansAttention``, routing only). Algorithms:

- ``fsat``: ``backend.fsat.attention(q, k, v, w, top_k)``;
- ``routing``: ``backend.routing.attention(q, k, v, centroids, window=W, profile=...)``
  (profile ``lucidrains`` by default, so the peer computes the same function on the same inputs);
- ``dense``: the baseline: ``torch.nn.functional.scaled_dot_product_attention`` for torch, a
  NumPy dense softmax attention (per head, float64) for the reference; only while it fits
  (``dense_max_gflop`` and, for NumPy, the L×L matrices within ``dense_max_bytes``).

Directions: ``fwd`` (torch under ``no_grad``), ``bwd`` (torch: the forward runs once when the case
is built, then ``out.backward(dout, retain_graph=True)`` is timed alone, gradients reset each call;
array backends: ``attention_vjp``, which recomputes the forward internally), ``fwdbwd``.
The callable ends with the backend's ``synchronize()``, so a timing includes the device's work.

Nothing here depends on a backend's name: what differs follows from the library of its arrays
(:func:`array_library`: torch tensors are timed with autograd, NumPy arrays get the NumPy dense
baseline and tracemalloc) and from its capabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import measure, models

ALGORITHMS = ("fsat", "routing", "dense")
DIRECTIONS = models.DIRECTIONS
PEER = "lucidrains"
LENGTHS = (1024, 4096, 16384, 65536)
NUMPY_DENSE_MAX_GFLOP = 150.0  # float64 matmuls per head: a few GFLOP/s on a small CPU


class Unsupported(Exception):
    """This backend cannot run this case here; ``str(error)`` is the reason."""


@dataclass(frozen=True)
class Shape:
    """B, H, L, D (Dv = D) and the algorithms' parameters. ``clusters``/``window`` None take the
    reference's defaults C = round(sqrt(L)), W = ceil(L / C) (C = W = 64 at L = 4096)."""

    batch: int
    heads: int
    length: int
    dim: int = 64
    top_k: int = 16
    clusters: int | None = None
    window: int | None = None

    @property
    def num_clusters(self) -> int:
        return self.clusters if self.clusters is not None else max(1, int(round(math.sqrt(self.length))))

    @property
    def window_size(self) -> int:
        window = self.window if self.window is not None else -(-self.length // self.num_clusters)
        return min(window, self.length)


def batch_for(length: int, tokens: int) -> int:
    """B with B·L near a fixed token budget (FlashAttention's sweep), at least 1."""
    return max(1, tokens // length)


@dataclass
class Case:
    backend: str
    algorithm: str
    direction: str
    dtype: str
    device: str
    shape: Shape
    fn: Callable[[], Any]
    framework: str  # the array library (array_library): picks the peak-memory method
    info: dict[str, Any] = field(default_factory=dict)

    def peak_memory(self) -> tuple[int | None, str]:
        """(bytes above the pre-call allocations, method) of one untimed call of ``fn``."""
        if self.framework == "numpy":
            return measure.peak_numpy(self.fn), "tracemalloc"
        if self.framework == "torch":
            if self.device.startswith("cuda"):
                return measure.peak_torch_cuda(self.fn, self.device), "torch.cuda.max_memory_allocated"
            return measure.peak_torch_cpu(self.fn), "torch.profiler memory events"
        if self.framework == "cupy":
            return measure.peak_cupy(self.fn), "cupy memory pool"
        return None, "not measured (unknown array library)"


def available_backends() -> list[str]:
    """Every registered backend name, then the peer."""
    from refattn import backends

    return [*backends.registered(), PEER]


def load_backend(name: str) -> Any:
    """The registry's backend, or :class:`Unsupported` with the loader's reason."""
    from refattn import backends

    try:
        return backends.get_backend(name)
    except Exception as error:  # noqa: BLE001 - any load failure is a skip with its reason
        raise Unsupported(f"backend {name!r} does not load here: {type(error).__name__}: {error}") from error


def _inputs(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, h, n, d = shape.batch, shape.heads, shape.length, shape.dim
    q, k, v, dout = (rng.standard_normal((b, h, n, d)) for _ in range(4))
    w = rng.standard_normal((h, d)) / math.sqrt(d)
    centroids = rng.standard_normal((h, shape.num_clusters, d))
    centroids /= np.linalg.norm(centroids, axis=-1, keepdims=True)
    return {"q": q, "k": k, "v": v, "dout": dout, "w": w, "centroids": centroids}


def _info(case_backend: str, algorithm: str, direction: str, dtype: str, device: str, shape: Shape,
          compute_dtype: str, device_name: str) -> dict[str, Any]:
    b, h, n, d = shape.batch, shape.heads, shape.length, shape.dim
    if algorithm == "fsat":
        flops = models.fsat_flops(b, h, n, d, shape.top_k, direction=direction)
        params = {"top_k": shape.top_k}
    elif algorithm == "routing":
        flops = models.routing_flops(b, h, n, d, shape.num_clusters, shape.window_size, direction=direction)
        params = {"clusters": shape.num_clusters, "window": shape.window_size}
    else:
        flops = models.dense_flops(b, h, n, d, direction=direction)
        params = {}
    itemsize = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 8)
    return {
        "backend": case_backend, "algorithm": algorithm, "direction": direction, "dtype": dtype,
        "compute_dtype": compute_dtype, "device": device, "device_name": device_name,
        "batch": b, "heads": h, "length": n, "dim": d, **params,
        "flops": flops, "dense_flops": models.dense_flops(b, h, n, d, direction=direction),
        "bytes": models.attention_bytes(b, h, n, d, itemsize=itemsize, direction=direction),
    }


# ----------------------------------------------------------------------------------------------
# NumPy dense baseline (float64, one head at a time so that only L×L matrices live at once)
# ----------------------------------------------------------------------------------------------


def _dense_numpy_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = np.empty(q.shape[:3] + (v.shape[-1],))
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            z = (q[b, h] @ k[b, h].T) * scale
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            out[b, h] = z @ v[b, h]
    return out


def _dense_numpy_vjp(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            p = (q[b, h] @ k[b, h].T) * scale
            p -= p.max(axis=1, keepdims=True)
            np.exp(p, out=p)
            p /= p.sum(axis=1, keepdims=True)
            dv[b, h] = p.T @ dout[b, h]
            dp = dout[b, h] @ v[b, h].T
            dp -= np.einsum("ij,ij->i", dp, p)[:, None]
            dp *= p
            dq[b, h] = (dp @ k[b, h]) * scale
            dk[b, h] = (dp.T @ q[b, h]) * scale
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------


def _dense_fits(numpy_arrays: bool, direction: str, shape: Shape, dense_max_gflop: float,
                dense_max_bytes: float) -> None:
    """Unsupported unless the dense baseline fits its budget (the NumPy baseline: a tighter one)."""
    flops = models.dense_flops(shape.batch, shape.heads, shape.length, shape.dim, direction=direction)
    if numpy_arrays:
        dense_max_gflop = min(dense_max_gflop, NUMPY_DENSE_MAX_GFLOP)
    if flops > dense_max_gflop * 1e9:
        raise Unsupported(f"dense at L={shape.length}: {flops / 1e9:.0f} GFLOP exceeds the dense budget "
                          f"({dense_max_gflop:.0f} GFLOP; raise --dense-max-gflop to run it)")
    if numpy_arrays:
        need = 3 * 8 * shape.length**2
        if need > dense_max_bytes:
            raise Unsupported(f"NumPy dense at L={shape.length} needs {need / 2**30:.1f} GiB of L×L matrices "
                              f"(limit {dense_max_bytes / 2**30:.1f} GiB)")


def array_library(backend: Any) -> str:
    """The library of the backend's arrays (``"numpy"``, ``"torch"``, ``"cupy"``, ``"numba"``, ...), read
    from one array its bridge makes; :class:`Unsupported` when it has no device here."""
    caps = backend.capabilities
    if not caps.devices:
        raise Unsupported(f"backend {backend.name!r} has no device here: {caps.unavailable}")
    probe = backend.from_numpy(np.zeros(1), caps.dtypes[0], caps.devices[0])
    return type(probe).__module__.partition(".")[0]


def _array_case(backend: Any, framework: str, algorithm: str, direction: str, dtype: str, shape: Shape,
                arrays: dict[str, np.ndarray], profile: str) -> tuple[Callable[[], Any], str, str, str]:
    """Backends with explicit ``*_vjp`` functions, timed through their array bridge.

    A backend whose only dtype is float64 promotes every input to it (the reference's contract,
    spec/interface.md): it runs every case in float64, its inputs first rounded to the case's dtype
    where NumPy has it.
    """
    caps = backend.capabilities
    device = caps.devices[0]
    if dtype in caps.dtypes:
        compute = dtype
        cast = {key: backend.from_numpy(value, dtype, device) for key, value in arrays.items()}
    elif caps.dtypes == ("float64",):
        compute = "float64"
        rounded = {key: value.astype(dtype) if dtype in ("float32", "float64") else value
                   for key, value in arrays.items()}
        cast = {key: backend.from_numpy(value, None, device) for key, value in rounded.items()}
    else:
        raise Unsupported(f"backend {backend.name!r} does not support {dtype} (supports {', '.join(caps.dtypes)})")
    device_name = measure.cpu_name() if framework == "numpy" else (backend.status or device)
    if direction != "fwd" and not caps.gradients:
        raise Unsupported(f"backend {backend.name!r} provides no gradients")
    q, k, v, dout = cast["q"], cast["k"], cast["v"], cast["dout"]
    if algorithm == "fsat":
        ns = backend.fsat
        forward = lambda: ns.attention(q, k, v, cast["w"], shape.top_k)  # noqa: E731
        backward = lambda: ns.attention_vjp(q, k, v, cast["w"], shape.top_k, dout)  # noqa: E731
    elif algorithm == "routing":
        ns = backend.routing
        cent, window = cast["centroids"], shape.window_size
        forward = lambda: ns.attention(q, k, v, cent, window=window, profile=profile)  # noqa: E731
        backward = lambda: ns.attention_vjp(q, k, v, cent, dout, window=window, profile=profile)  # noqa: E731
    else:
        if framework != "numpy":
            raise Unsupported(f"the dense baseline runs on torch (SDPA) and NumPy arrays only, not {backend.name!r}")
        forward = lambda: _dense_numpy_forward(q, k, v)  # noqa: E731
        backward = lambda: _dense_numpy_vjp(q, k, v, dout)  # noqa: E731

    def run() -> Any:
        result = None
        if direction in ("fwd", "fwdbwd"):
            result = forward()
        if direction in ("bwd", "fwdbwd"):
            result = backward()
        backend.synchronize()
        return result

    return run, device, device_name, compute


def _torch_case(name: str, algorithm: str, direction: str, dtype: str, shape: Shape, arrays: dict[str, np.ndarray],
                profile: str, device: str | None) -> tuple[Callable[[], Any], str, str, str]:
    """Torch tensors with autograd: the registry's backends whose arrays are tensors, and the peer."""
    import torch

    dtypes = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise Unsupported(f"unknown dtype {dtype!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Unsupported("no CUDA device here")
    tdtype = dtypes[dtype]
    grad_names = ("q", "k", "v", "w") if algorithm == "fsat" else ("q", "k", "v")
    tensors = {key: torch.from_numpy(value).to(device=device, dtype=tdtype) for key, value in arrays.items()}
    if direction != "fwd":
        for key in grad_names:
            tensors[key].requires_grad_(True)
    q, k, v, dout = tensors["q"], tensors["k"], tensors["v"], tensors["dout"]

    if name == PEER:
        if algorithm != "routing":
            raise Unsupported("the lucidrains peer implements routing attention only")
        if profile != "lucidrains":
            raise Unsupported("the lucidrains peer computes the 'lucidrains' profile only")
        try:
            from routing_transformer import KmeansAttention
        except ImportError as error:
            raise Unsupported(f"routing_transformer is not installed (pip install 'refattn[peer]'): {error}") from error
        attn = KmeansAttention(shape.num_clusters, shape.window_size, shape.heads, shape.dim, causal=False,
                               shared_qk=False, dropout=0.0).to(device=device, dtype=tdtype).eval()
        with torch.no_grad():  # eval mode with fixed centroids: no k-means update, no data-dependent init
            attn.kmeans.means.copy_(tensors["centroids"])
            attn.kmeans.initted.fill_(True)
        for parameter in attn.parameters():
            parameter.requires_grad_(False)
        forward = lambda: attn(q, k, v)[0]  # noqa: E731
    else:
        backend = load_backend(name)
        if algorithm != "dense" and not callable(getattr(getattr(backend, algorithm, None), "attention", None)):
            raise Unsupported(f"backend {name!r} has no {algorithm}.attention")
        if algorithm == "fsat":
            forward = lambda: backend.fsat.attention(q, k, v, tensors["w"], shape.top_k)  # noqa: E731
        elif algorithm == "routing":
            cent, window = tensors["centroids"], shape.window_size
            forward = lambda: backend.routing.attention(q, k, v, cent, window=window, profile=profile)  # noqa: E731
        else:
            sdpa = torch.nn.functional.scaled_dot_product_attention
            forward = lambda: sdpa(q, k, v)  # noqa: E731

    if name == PEER:
        sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    else:
        sync = backend.synchronize
    leaves = [tensors[key] for key in grad_names]

    def reset() -> None:
        for leaf in leaves:
            leaf.grad = None

    if direction == "fwd":
        def run() -> Any:
            with torch.no_grad():
                out = forward()
            sync()
            return out
    elif direction == "bwd":
        out = forward()  # once: backward alone is timed (FlashAttention's benchmark_backward)
        sync()

        def run() -> Any:
            reset()
            out.backward(dout, retain_graph=True)
            sync()
            return [leaf.grad for leaf in leaves]
    else:
        def run() -> Any:
            reset()
            result = forward()
            result.backward(dout)
            sync()
            return [leaf.grad for leaf in leaves]

    device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else measure.cpu_name()
    compute = dtype if dtype in ("float32", "float64") else "float32"
    return run, device, device_name, compute


def build_case(backend: str, algorithm: str, direction: str, dtype: str, shape: Shape, *,
               profile: str = "lucidrains", device: str | None = None, dense_max_gflop: float = 2500.0,
               dense_max_bytes: float = 2 * 2**30, seed: int = 0) -> Case:
    """The timed case, or :class:`Unsupported` with the reason it cannot run here."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if algorithm == "routing" and shape.window_size > shape.length:
        raise Unsupported(f"window {shape.window_size} > L {shape.length}")
    if backend == PEER:
        framework = "torch"
    else:
        loaded = load_backend(backend)
        framework = array_library(loaded)
    if algorithm == "dense":
        _dense_fits(framework == "numpy", direction, shape, dense_max_gflop, dense_max_bytes)
    arrays = _inputs(shape, seed)
    if framework == "torch":
        fn, dev, device_name, compute = _torch_case(backend, algorithm, direction, dtype, shape, arrays, profile,
                                                    device)
    else:
        fn, dev, device_name, compute = _array_case(loaded, framework, algorithm, direction, dtype, shape, arrays,
                                                    profile)
    info = _info(backend, algorithm, direction, dtype, dev, shape, compute, device_name)
    info["framework"] = framework
    if framework != "torch" and direction == "bwd":
        info["note"] = "bwd = attention_vjp, which recomputes the forward"
    return Case(backend, algorithm, direction, dtype, dev, shape, fn, framework, info)
