#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with the extras asked for.
#
#   scripts/install.sh [VENV] [EXTRA ...]      (default VENV .venv; default EXTRAs: all of them)
#
# EXTRAs are pyproject.toml's: torch, cupy, numba, test, bench, peer; `core` alone installs the package with NumPy
# and SciPy only (what the reference needs). `make conformance` asks for core and the extras of its backends; `make test` (CI) for all, including the GPU libraries' small wheels (cupy-cuda12x, numba,
# numba-cuda, NVRTC), with which a machine without a GPU compiles the kernels, runs Numba's CUDA simulator and
# executes the CuPy kernels as CUDA C emulated on the CPU.
#
# torch: an environment that already imports torch keeps it. Otherwise a machine with an NVIDIA GPU (nvidia-smi
# lists one) gets PyPI's default build, which is the CUDA one; a machine without gets the CPU build ("+cpu", a few
# hundred MB instead of several GB of CUDA wheels), from the configured indexes when they have it, else from
# PyTorch's CPU index. TORCH_VERSION (default 2.13.0) and TORCH_CPU_INDEX override the version and that index.
set -euo pipefail
venv="${1:-.venv}"
[ $# -gt 0 ] && shift
extras=("$@")
[ ${#extras[@]} -gt 0 ] || extras=(torch cupy numba test bench peer)
python="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.13.0}"
torch_cpu_index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

wants() {
  local extra
  for extra in "${extras[@]}"; do [ "$extra" = "$1" ] && return 0; done
  return 1
}
for extra in "${extras[@]}"; do
  case "$extra" in
    core|torch|cupy|numba|test|bench|peer) ;;
    *) echo "scripts/install.sh: unknown extra '$extra'; choose from core torch cupy numba test bench peer" >&2
       exit 2 ;;
  esac
done

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip

if wants torch || wants peer; then
  if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "torch: keeping $("$venv/bin/python" -c "import torch; print(torch.__version__)")"
  elif nvidia-smi -L >/dev/null 2>&1; then
    echo "torch: an NVIDIA GPU is present: torch==$torch_version from PyPI (the CUDA build)"
    "${pip[@]}" "torch==$torch_version"
  else
    echo "torch: no NVIDIA GPU: the CPU build torch==$torch_version+cpu"
    "${pip[@]}" "torch==$torch_version+cpu" 2>/dev/null \
      || "${pip[@]}" "torch==$torch_version+cpu" --extra-index-url "$torch_cpu_index"
  fi
fi

selected=()
for extra in torch cupy numba test bench; do wants "$extra" && selected+=("$extra"); done
spec="."
[ ${#selected[@]} -gt 0 ] && spec=".[$(IFS=,; echo "${selected[*]}")]"
"${pip[@]}" -e "$spec"

# The GPU libraries at the versions CI checks (small wheels; no CUDA toolkit wheels come with them).
gpu=()
wants cupy && gpu+=("cupy-cuda12x==14.2.0")
wants numba && gpu+=("numba==0.68.1" "numba-cuda==0.30.4")
if wants cupy || wants numba; then gpu+=("nvidia-cuda-nvrtc-cu12==12.9.86"); fi
[ ${#gpu[@]} -eq 0 ] || "${pip[@]}" "${gpu[@]}"

if wants peer; then
  # The peer implementation the lucidrains profile is checked against. Its metadata asks for an unpinned torch,
  # so it goes in without dependencies and they follow by name (torch is already there).
  "${pip[@]}" --no-deps "routing-transformer==1.6.1"
  "${pip[@]}" einops local-attention mixture-of-experts product-key-memory
fi
"$venv/bin/python" -m pip check
