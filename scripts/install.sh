#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with everything the tests and the
# conformance report use. Usage: scripts/install.sh [VENV]   (default .venv)
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

"${pip[@]}" --upgrade pip
# torch first, pinned: any other torch requirement on a fresh machine pulls a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[torch,test,bench]"
# The GPU backends' libraries, pinned: on a machine without a GPU they import, their kernels compile
# (NVRTC), and their conformance is reported as skipped with the reason.
"${pip[@]}" "cupy-cuda12x==14.2.0" "numba==0.68.1" "numba-cuda==0.30.4" "nvidia-cuda-nvrtc-cu12==12.9.86"
# The peer implementation the lucidrains profile is checked against. Its own metadata asks for an
# unpinned torch, so it goes in without dependencies and they follow by name.
"${pip[@]}" --no-deps "routing-transformer==1.6.1"
"${pip[@]}" einops local-attention mixture-of-experts product-key-memory
"$venv/bin/python" -m pip check
