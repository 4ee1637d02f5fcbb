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
  (``dense_max_gflop``, by default 2,500 GFLOP for SDPA and 150 for NumPy's, and for NumPy the L×L
  matrices within ``dense_max_bytes``, by default the memory available or 2 GiB).

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
DENSE_MAX_GFLOP = 2500.0  # SDPA fwd+bwd at L = 16,384, B = 1 is ~1,900 GFLOP
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


def input_names(algorithm: str, direction: str) -> tuple[str, ...]:
    """The arrays a case is called with: q, k, v, then w (FSAT) or the centroids (routing), then dout
    unless the case is forward-only."""
    extra = {"fsat": ("w",), "routing": ("centroids",)}.get(algorithm, ())
    return ("q", "k", "v", *extra) + (("dout",) if direction != "fwd" else ())


def _input_dtype(dtype: str) -> type:
    """The NumPy dtype the inputs are drawn in: float64 for float64 cases, else float32 (half-precision
    tensors are rounded from it), so that a case at L = 2,097,152 never holds float64 copies it does not use."""
    return np.float64 if dtype == "float64" else np.float32


def _inputs(shape: Shape, names: tuple[str, ...], dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, h, n, d = shape.batch, shape.heads, shape.length, shape.dim
    kind = _input_dtype(dtype)
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        if name == "w":
            arrays[name] = (rng.standard_normal((h, d)) / math.sqrt(d)).astype(kind)
        elif name == "centroids":
            centroids = rng.standard_normal((h, shape.num_clusters, d))
            arrays[name] = (centroids / np.linalg.norm(centroids, axis=-1, keepdims=True)).astype(kind)
        else:
            arrays[name] = rng.standard_normal((b, h, n, d), dtype=kind)
    return arrays


def minimum_bytes(algorithm: str, direction: str, dtype: str, shape: Shape) -> int:
    """A lower bound of the memory a case needs: its (B, H, L, D) inputs as drawn (all exist at once
    before they are converted), then the output and, with a backward, the gradients of q, k, v, in
    the case's dtype. A case whose bound exceeds the available memory cannot run: it is skipped
    before anything is allocated."""
    rows = shape.batch * shape.heads * shape.length * shape.dim
    itemsize = models.ITEMSIZE[dtype]
    arrays = sum(name in ("q", "k", "v", "dout") for name in input_names(algorithm, direction))
    results = 1 if direction == "fwd" else 4  # out; out, dq, dk, dv
    return rows * (arrays * max(itemsize, np.dtype(_input_dtype(dtype)).itemsize) + results * itemsize)


def flops(algorithm: str, direction: str, shape: Shape) -> float:
    """The work a case does (:mod:`.models`): FSAT's or routing's own count, or dense attention's."""
    b, h, n, d = shape.batch, shape.heads, shape.length, shape.dim
    if algorithm == "fsat":
        return models.fsat_flops(b, h, n, d, shape.top_k, direction=direction)
    if algorithm == "routing":
        return models.routing_flops(b, h, n, d, shape.num_clusters, shape.window_size, direction=direction)
    return models.dense_flops(b, h, n, d, direction=direction)


def _info(case_backend: str, algorithm: str, direction: str, dtype: str, device: str, shape: Shape,
          compute_dtype: str, device_name: str) -> dict[str, Any]:
    b, h, n, d = shape.batch, shape.heads, shape.length, shape.dim
    params = {"fsat": {"top_k": shape.top_k}, "routing": {"clusters": shape.num_clusters, "window": shape.window_size}}
    itemsize = models.ITEMSIZE.get(dtype, 8)
    return {
        "backend": case_backend, "algorithm": algorithm, "direction": direction, "dtype": dtype,
        "compute_dtype": compute_dtype, "device": device, "device_name": device_name,
        "batch": b, "heads": h, "length": n, "dim": d, **params.get(algorithm, {}),
        "flops": flops(algorithm, direction, shape), "dense_flops": models.dense_flops(b, h, n, d, direction=direction),
        "bytes": models.attention_bytes(b, h, n, d, itemsize=itemsize, direction=direction),
    }


# ----------------------------------------------------------------------------------------------
# NumPy dense baseline (float64, one head at a time so that only L×L matrices live at once)
# ----------------------------------------------------------------------------------------------


def _dense_weights(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """softmax(q kᵀ scale) of one head, (L, L), computed in place."""
    p = (q @ k.T) * scale
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    return p


def _dense_numpy_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = np.empty(q.shape[:3] + (v.shape[-1],))
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h] = _dense_weights(q[b, h], k[b, h], scale) @ v[b, h]
    return out


def _dense_numpy_vjp(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            p = _dense_weights(q[b, h], k[b, h], scale)
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


def _dense_fits(numpy_arrays: bool, direction: str, shape: Shape, dense_max_gflop: float | None,
                dense_max_bytes: float) -> None:
    """Unsupported unless the dense baseline fits its budget (None: the default of its framework)."""
    flops = models.dense_flops(shape.batch, shape.heads, shape.length, shape.dim, direction=direction)
    if dense_max_gflop is None:
        dense_max_gflop = NUMPY_DENSE_MAX_GFLOP if numpy_arrays else DENSE_MAX_GFLOP
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
                arrays: dict[str, np.ndarray], profile: str
                ) -> tuple[Callable[[], Any], str, str, str, dict[str, Any]]:
    """Backends with explicit ``*_vjp`` functions, timed through their array bridge.

    A backend whose only dtype is float64 promotes every input to it (the reference's contract,
    spec/interface.md): it runs every case in float64 (its compute dtype, which the table shows), on
    inputs drawn in float32 for the float32 and half-precision cases.
    """
    caps = backend.capabilities
    device = caps.devices[0]
    if dtype in caps.dtypes:
        compute = dtype
        cast = {key: backend.from_numpy(value, dtype, device) for key, value in arrays.items()}
    elif caps.dtypes == ("float64",):
        compute = "float64"
        cast = {key: backend.from_numpy(value, None, device) for key, value in arrays.items()}
    else:
        raise Unsupported(f"backend {backend.name!r} does not support {dtype} (supports {', '.join(caps.dtypes)})")
    device_name = measure.cpu_name() if framework == "numpy" else (backend.status or device)
    if direction != "fwd" and not caps.gradients:
        raise Unsupported(f"backend {backend.name!r} provides no gradients")
    q, k, v, dout = cast["q"], cast["k"], cast["v"], cast.get("dout")
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

    return run, device, device_name, compute, cast


def _torch_case(name: str, algorithm: str, direction: str, dtype: str, shape: Shape, arrays: dict[str, np.ndarray],
                profile: str, device: str | None, sdpa: str | None
                ) -> tuple[Callable[[], Any], str, str, str, dict[str, Any]]:
    """Torch tensors with autograd: the registry's backends whose arrays are tensors, and the peer.

    ``sdpa`` names the kernel the dense baseline must use (``"flash"``: FlashAttention, the GPU
    targets' baseline); None lets torch choose.
    """
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
    tensors = {}
    for key in list(arrays):  # converted one by one, each NumPy array dropped once copied
        tensors[key] = torch.from_numpy(arrays.pop(key)).to(device=device, dtype=tdtype)
    if direction != "fwd":
        for key in grad_names:
            tensors[key].requires_grad_(True)
    q, k, v, dout = tensors["q"], tensors["k"], tensors["v"], tensors.get("dout")

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
        elif sdpa is None:
            attend = torch.nn.functional.scaled_dot_product_attention
            forward = lambda: attend(q, k, v)  # noqa: E731
        else:
            forward = _sdpa_with(sdpa, q, k, v)

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
    return run, device, device_name, dtype, tensors


def _sdpa_with(kernel: str, q: Any, k: Any, v: Any) -> Callable[[], Any]:
    """``scaled_dot_product_attention`` restricted to one kernel (``"flash"``, ``"efficient"``, ``"math"``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}
    if kernel not in kernels:
        raise ValueError(f"sdpa: expected one of {', '.join(kernels)}, got {kernel!r}")

    def forward() -> Any:
        with sdpa_kernel(kernels[kernel]):
            return scaled_dot_product_attention(q, k, v)

    return forward


def build_case(backend: str, algorithm: str, direction: str, dtype: str, shape: Shape, *,
               profile: str = "lucidrains", device: str | None = None, dense_max_gflop: float | None = None,
               dense_max_bytes: float | None = None, memory_available: int | None = None, sdpa: str | None = None,
               seed: int = 0) -> Case:
    """The timed case, or :class:`Unsupported` with the reason it cannot run here.

    ``memory_available`` (bytes): skip the case, before anything is allocated, when even
    :func:`minimum_bytes` exceeds it (and NumPy's dense baseline when its L×L matrices do, unless
    ``dense_max_bytes`` says otherwise). ``sdpa``: the dense baseline's kernel on torch (None: torch's choice).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if dtype not in models.ITEMSIZE:
        raise ValueError(f"dtype: expected one of {', '.join(models.ITEMSIZE)}, got {dtype!r}")
    if algorithm == "routing" and shape.window_size > shape.length:
        raise Unsupported(f"window {shape.window_size} > L {shape.length}")
    if backend == PEER:
        framework = "torch"
    else:
        loaded = load_backend(backend)
        framework = array_library(loaded)
    if algorithm == "dense":
        if dense_max_bytes is None:
            dense_max_bytes = memory_available if memory_available is not None else 2 * 2**30
        _dense_fits(framework == "numpy", direction, shape, dense_max_gflop, dense_max_bytes)
    needed = minimum_bytes(algorithm, direction, dtype, shape)
    if memory_available is not None and needed > memory_available:
        raise Unsupported(f"needs at least {needed / 2**30:.1f} GiB (inputs, output and gradients), "
                          f"{memory_available / 2**30:.1f} GiB available")
    arrays = _inputs(shape, input_names(algorithm, direction), dtype, seed)
    if framework == "torch":
        fn, dev, device_name, compute, inputs = _torch_case(backend, algorithm, direction, dtype, shape, arrays,
                                                            profile, device, sdpa)
    else:
        fn, dev, device_name, compute, inputs = _array_case(loaded, framework, algorithm, direction, dtype, shape,
                                                            arrays, profile)
    del arrays
    info = _info(backend, algorithm, direction, dtype, dev, shape, compute, device_name)
    info["framework"] = framework
    info["input_bytes"] = sum(int(x.nbytes) for x in inputs.values())  # what the peak memory is measured above
    if sdpa is not None and algorithm == "dense":
        info["sdpa"] = sdpa
    if framework != "torch" and direction == "bwd":
        info["note"] = "bwd = attention_vjp, which recomputes the forward"
    return Case(backend, algorithm, direction, dtype, dev, shape, fn, framework, info)
