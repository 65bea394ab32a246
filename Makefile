# Quick start: `make demo` (set up + run on built-in synthetic data), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: setup demo test test-containers lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# Simulate a small synthetic validation set, extract its SIFT landmarks, compute the
# ground-truth displacement fields, validate and score them (0 mm) and the identity
# prediction, and rank the two as teams in a report. Reruns keep finished work.
demo: setup
	$(PY) -m tusrec simulate $(DEMO)/data --subjects 50 --scans 4 --frames 60 --no-landmarks
	./landmarks $(DEMO)/data
	$(PY) -m tusrec info $(DEMO)/data
	$(PY) -m tusrec reference ground-truth $(DEMO)/data --out $(DEMO)/ground_truth
	./evaluate check $(DEMO)/ground_truth --data $(DEMO)/data
	./evaluate score $(DEMO)/ground_truth --data $(DEMO)/data --out $(DEMO)/scores/ground_truth
	$(PY) -m tusrec reference identity $(DEMO)/data --out $(DEMO)/identity
	./evaluate score $(DEMO)/identity --data $(DEMO)/data --out $(DEMO)/scores/identity
	./evaluate rank --team ground-truth=$(DEMO)/scores/ground_truth --team identity=$(DEMO)/scores/identity \
		--out $(DEMO)/ranking --synthetic --title "tusrec demo: reference predictions on synthetic scans"
	@echo "demo: synthetic data in $(DEMO)/data, per-scan metrics in $(DEMO)/scores/*/metrics.csv,"
	@echo "      ranking report in $(DEMO)/ranking/report.html"

test: setup
	$(PY) -m pytest -q

# The images and the organisers' runner in podman (installs it and makes a base image once).
test-containers: setup
	CONTAINERS_CONF="$$(bash .ci/containers.sh | tail -n 1)" $(PY) -m pytest -q tests/test_containers.py

lint: setup
	$(VENV)/bin/ruff check tusrec tests benchmarks
	$(VENV)/bin/ruff format --check tusrec tests benchmarks

bench: setup
	$(PY) -m benchmarks.run --out benchmarks/results.json

clean:
	rm -rf $(DEMO) bench-data .pytest_cache .ruff_cache
