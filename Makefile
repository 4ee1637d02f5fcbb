# The two commands of the README. Both install into $(VENV) first (idempotent).
VENV ?= .venv

# The backends `make conformance` installs and checks: the reference and torch, and on a machine with an NVIDIA
# GPU also CuPy and Numba-CUDA. Choose others with: make conformance BACKENDS="numpy torch cupy numba_cuda"
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
BACKENDS ?= numpy torch $(if $(GPU),cupy numba_cuda)
# The pip extra each backend needs (the reference needs none).
extra_of = $(patsubst numba_cuda,numba,$(filter torch cupy numba_cuda,$(1)))

.PHONY: conformance test install device-check

# Everything: the backends' libraries, the tests' and the benchmarks' (what `make test` and CI use).
install:
	scripts/install.sh $(VENV)

# The main job: the conformance report of the chosen backends (those that cannot run here say why).
conformance:
	scripts/install.sh $(VENV) core $(call extra_of,$(BACKENDS))
	$(VENV)/bin/refattn info
	$(VENV)/bin/refattn conformance $(addprefix --backend ,$(BACKENDS))

# The suite on one worker process per core, at most 4 (pytest-xdist): 17 minutes on 2 cores instead of 26.
test: install
	$(VENV)/bin/python -m pytest -n auto --maxprocesses 4

# On a CUDA machine (no network needed): every GPU stage, results in OUT (scripts/device_check.sh says which).
# DRY_RUN=1 prints the stages and checks the environment only, on any machine.
OUT ?= device-check
PYTHON ?= python3
device-check:
	PYTHON=$(PYTHON) scripts/device_check.sh $(if $(DRY_RUN),--dry-run) "$(OUT)"
