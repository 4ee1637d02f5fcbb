# The two commands of the README. Both install into .venv first (idempotent).
VENV ?= .venv

.PHONY: conformance test install device-check

install:
	scripts/install.sh $(VENV)

# The main job: the conformance report of every backend this machine can run.
conformance: install
	$(VENV)/bin/refattn info
	$(VENV)/bin/refattn conformance

test: install
	$(VENV)/bin/python -m pytest

# On a CUDA machine (no network needed): every GPU stage, results in OUT (scripts/device_check.sh says which).
# DRY_RUN=1 prints the stages and checks the environment only, on any machine.
OUT ?= device-check
PYTHON ?= python3
device-check:
	PYTHON=$(PYTHON) scripts/device_check.sh $(if $(DRY_RUN),--dry-run) "$(OUT)"
