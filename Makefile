# The two commands of the README. Both install into .venv first (idempotent).
VENV ?= .venv

.PHONY: conformance test install

install:
	scripts/install.sh $(VENV)

# The main job: the conformance report of every backend this machine can run.
conformance: install
	$(VENV)/bin/refattn info
	$(VENV)/bin/refattn conformance

test: install
	$(VENV)/bin/python -m pytest
