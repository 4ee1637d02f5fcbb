"""The package surface: backend selection, the registry's errors, lazy imports, the CLI, the wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

import refattn
from refattn import backends

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
               python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "REFATTN_BACKEND"}
    environment.update(env or {})
    return subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=120)


def test_import_leaves_torch_cupy_numba_unimported() -> None:
    result = run_python("""
        import sys, refattn, refattn.ops
        print(sorted(name for name in ("torch", "cupy", "numba") if name in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_ops_works_after_a_plain_import_refattn_and_imports_no_backend_library() -> None:
    """The README's line ``refattn.ops.fsat.attention(...)`` after ``import refattn`` alone."""
    result = run_python("""
        import sys
        import numpy as np
        import refattn

        rng = np.random.default_rng(0)
        q, k, v = rng.standard_normal((3, 1, 2, 8, 4))
        out = refattn.ops.fsat.attention(q, k, v, np.ones((2, 4)), top_k=3)
        print(out.shape, refattn.ops.name, sorted(name for name in ("torch", "cupy", "numba") if name in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 2, 8, 4) numpy []"


def test_backends_and_conformance_import_no_private_name_of_refattn() -> None:
    """backends/ and conformance/ import refattn's public names only, and no backend another's."""
    private = re.compile(r"from refattn(\.[a-z_]+)*\._|import refattn\..*\._|from \.\._|_stable_argsort")
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for folder in ("backends", "conformance") for path in sorted((REPO / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert found == []


def test_every_builtin_backend_has_a_synchronize() -> None:
    assert refattn.get_backend("numpy").synchronize() is None
    for name in ("torch", "cupy", "numba_cuda"):
        try:
            backend = refattn.get_backend(name)
        except refattn.BackendUnavailableError as error:
            print(f"{name}: not checked, {error}")
            continue
        assert backend.synchronize() is None  # returns at once without a device


def test_bench_treats_a_backend_by_its_arrays_and_synchronizes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A renamed copy of the reference is benchmarked exactly like it: nothing depends on the name,
    and every timed call ends with the backend's synchronize()."""
    from refattn.bench import cases

    synchronized: list[str] = []
    toy = backends.Backend(name="toy", fsat=refattn.fsat, routing=refattn.routing,
                           capabilities=refattn.get_backend("numpy").capabilities,
                           synchronize=lambda: synchronized.append("toy"))
    monkeypatch.setattr(cases, "load_backend", lambda name: toy)
    shape = cases.Shape(batch=1, heads=2, length=16, dim=4, top_k=3)
    for algorithm in ("fsat", "routing", "dense"):
        case = cases.build_case("toy", algorithm, "fwdbwd", "float32", shape)
        assert (case.framework, case.info["compute_dtype"], case.info["framework"]) == ("numpy", "float64", "numpy")
        case.fn()
    assert synchronized == ["toy"] * 3


def test_unknown_backend_variable_fails_the_import_listing_the_backends() -> None:
    result = run_python("import refattn", env={"REFATTN_BACKEND": "jax"})
    assert result.returncode != 0
    assert "REFATTN_BACKEND: unknown backend 'jax'; available: cupy, numba_cuda, numpy, torch" in result.stderr


def test_backend_variable_selects_ops() -> None:
    result = run_python("""
        import refattn, refattn.ops
        print(refattn.SELECTED_BACKEND, refattn.ops.name, refattn.ops.fsat is refattn.fsat,
              refattn.ops.routing is refattn.routing)
    """, env={"REFATTN_BACKEND": "numpy"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numpy", "numpy", "True", "True"]


def test_default_backend_is_the_reference() -> None:
    reference = refattn.get_backend("numpy")
    assert reference.fsat is refattn.fsat and reference.routing is refattn.routing
    assert reference.capabilities.gradients


def test_get_backend_unknown_name_lists_the_choices() -> None:
    with pytest.raises(refattn.UnknownBackendError, match=r"unknown backend 'mxnet'; available: .*numpy.*torch"):
        refattn.get_backend("mxnet")


def test_backend_whose_library_is_missing_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    backends.get_backend.cache_clear()
    try:
        with pytest.raises(refattn.BackendUnavailableError, match=r"pip install 'refattn\[cupy\]'"):
            refattn.get_backend("cupy")
    finally:
        backends.get_backend.cache_clear()


def test_third_party_backend_registers_through_an_entry_point(tmp_path: Path) -> None:
    (tmp_path / "toy_backend.py").write_text(textwrap.dedent("""
        import refattn
        from refattn.backends import Backend, Capabilities

        def backend():
            return Backend(name="toy", fsat=refattn.fsat, routing=refattn.routing,
                           capabilities=Capabilities(dtypes=("float64",), devices=("cpu",)))
    """))
    dist_info = tmp_path / "toy_backend-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backend\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[refattn.backends]\ntoy = toy_backend:backend\n")
    result = run_python("""
        import refattn, refattn.ops
        print(refattn.registered()["toy"], refattn.ops.name, refattn.ops.fsat is refattn.fsat)
    """, env={"REFATTN_BACKEND": "toy", "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["entry", "point", "toy_backend:backend", "toy", "True"]


def test_entry_point_shadowing_a_builtin_is_ignored_with_a_warning(tmp_path: Path) -> None:
    dist_info = tmp_path / "shadow-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: shadow\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[refattn.backends]\ntorch = shadow:backend\n")
    result = run_python("""
        import warnings
        warnings.simplefilter("always")
        import refattn
        print(refattn.registered()["torch"])
    """, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "built-in"
    assert "ignoring entry point 'torch'" in result.stderr


def test_cli_info_lists_every_builtin_backend() -> None:
    result = subprocess.run([sys.executable, "-m", "refattn", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"refattn {refattn.__version__}" in result.stdout
    for name in ("numpy", "torch", "cupy", "numba_cuda"):
        assert f"  {name} " in result.stdout


def test_cli_rejects_an_unknown_command() -> None:
    result = subprocess.run([sys.executable, "-m", "refattn", "frobnicate"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


@pytest.mark.slow
def test_wheel_installs_the_same_import_surface_as_the_editable_install(tmp_path: Path) -> None:
    # Built from a copy without build/: setuptools reuses build/lib, so modules a checkout has since moved or
    # deleted would still land in the wheel.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".hypothesis"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("refattn-*.whl"))
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = str(environment / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    imported = run_python("""
        import refattn, refattn.backends, refattn.conformance, refattn.cli, refattn.fsat, refattn.routing
        print(refattn.backends.__file__)
        print(refattn.get_backend("numpy").name)
    """, python=python, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    site = environment / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert imported.stdout.split() == [str(site / "refattn" / "backends" / "__init__.py"), "numpy"]
    # The wheel holds exactly the modules of the source folders, under the names the editable install gives them.
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                    for name in archive.namelist() if name.endswith(".py")}
    assert in_wheel == source_modules()
    # ... and the CUDA sources and the header of their CPU emulation, which are package data.
    data = {"refattn/backends/cupy/kernels/fsat_sparse_attention.cu",
            "refattn/backends/cuda_emulation/cuda_emulation.h"}
    assert data <= set(archive.namelist())


def source_modules() -> set[str]:
    """Module names of the checkout, with backends/ and conformance/ mapped under refattn."""
    folders = {"refattn": REPO / "refattn", "refattn.backends": REPO / "backends",
               "refattn.conformance": REPO / "conformance"}
    names = set()
    for prefix, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            names.add(".".join((prefix, *parts)).removesuffix(".__init__"))
    return names
