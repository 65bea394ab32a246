# Quick start: `make demo` (set up + run on built-in synthetic data), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: setup wheel demo test test-containers test-slurm lint bench bench-accuracy bench-gpu clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The kit as a wheel (dist/tusrec-<version>-py3-none-any.whl), the way a team's image installs
# it: `pip install tusrec-*.whl[predict]` takes the predictor's libraries only (extras:
# predict, harness, train, cluster; pyproject.toml). `tusrec new-submission` builds the same.
wheel: setup
	$(PY) -c "from tusrec.harness.starter import build_wheel; print(build_wheel('dist'))"

# The whole story on built-in synthetic data: simulate a small validation set (subject
# 50, never trained on), extract its SIFT landmarks, predict it with the shipped ensemble
# and with its best single member, validate and score both and the identity prediction,
# and rank the three as teams in a report. Reruns keep finished work.
# (Both protocols' scans in one simulate command: one interpreter and one anatomy set-up.)
demo: setup
	$(PY) -m tusrec simulate $(DEMO)/data --subjects 50 --frames 150 --no-landmarks \
		--scans LH_Par_C_DtP,RH_Per_L_PtD,LH_Per_S_DtP,RH_Par_L_PtD,LH_rotation,RH_rotation
	./landmarks $(DEMO)/data
	$(PY) -m tusrec info $(DEMO)/data
	$(PY) -m tusrec weights
	./predict --input $(DEMO)/data --output $(DEMO)/ensemble
	./predict --input $(DEMO)/data --output $(DEMO)/best-member --members $$($(PY) -m tusrec weights --best)
	$(PY) -m tusrec reference identity $(DEMO)/data --out $(DEMO)/identity
	./evaluate check $(DEMO)/ensemble --data $(DEMO)/data
	./evaluate score $(DEMO)/ensemble --data $(DEMO)/data --out $(DEMO)/scores/ensemble
	./evaluate score $(DEMO)/best-member --data $(DEMO)/data --out $(DEMO)/scores/best-member
	./evaluate score $(DEMO)/identity --data $(DEMO)/data --out $(DEMO)/scores/identity
	./evaluate rank --team ensemble=$(DEMO)/scores/ensemble --team best-member=$(DEMO)/scores/best-member \
		--team identity=$(DEMO)/scores/identity --out $(DEMO)/ranking --synthetic \
		--title "tusrec demo: the shipped ensemble, its best member and the identity on synthetic scans"
	@echo "demo: synthetic data in $(DEMO)/data, predictions in $(DEMO)/{ensemble,best-member,identity},"
	@echo "      per-scan metrics in $(DEMO)/scores/*/metrics.csv,"
	@echo "      ranking report in $(DEMO)/ranking/report.html"

test: setup
	$(PY) -m pytest -q

# The images and the organisers' runner in podman (installs it and makes a base image once).
test-containers: setup
	CONTAINERS_CONF="$$(bash .ci/containers.sh | tail -n 1)" $(PY) -m pytest -q tests/test_containers.py

# The README's Slurm recipe run for real (as root): podman as for test-containers, a one-node
# Slurm from Debian's packages (scripts/slurm-one-node.sh up; its epilog gets the same podman
# settings), tests/test_slurm.py against it, then the daemons stopped again, pass or fail.
# About 3.5 min on a 2-core machine; not part of `make test` or CI (README, Slurm).
test-slurm: setup
	conf="$$(bash .ci/containers.sh | tail -n 1)"; \
		CONTAINERS_CONF="$$conf" scripts/slurm-one-node.sh up && \
		CONTAINERS_CONF="$$conf" $(PY) -m pytest -q -s -rs tests/test_slurm.py; \
		rc=$$?; scripts/slurm-one-node.sh down; exit $$rc

lint: setup
	$(VENV)/bin/ruff check tusrec tests benchmarks research scripts
	$(VENV)/bin/ruff format --check tusrec tests benchmarks research scripts
	$(VENV)/bin/hadolint Dockerfile

bench: setup
	$(PY) -m benchmarks.run --out benchmarks/results.json

# Accuracy of the shipped ensemble against the identity, the frame-pair baseline and each
# member, on simulated held-out subjects (2.5 min of scoring on 2 cores, after simulating the
# data once; it is kept in bench-data/).
bench-accuracy: setup
	$(PY) -m benchmarks.accuracy --out benchmarks/accuracy.json

# The CUDA paths on a GPU (about 10 min): ./predict on the GPU against the CPU, a 1,600-frame
# scan end to end, 2 min of mixed-precision training -> benchmarks/gpu.json. Exits 2 with one
# line where there is no CUDA. Runs with the .venv when there is one, else with $(PYTHON) (a
# GPU machine's own torch; it needs requirements.txt's other packages). Try it on the CPU:
#   .venv/bin/python -m benchmarks.gpu --device cpu --frames 60 --long-frames 300 --train-seconds 20
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m benchmarks.gpu --out benchmarks/gpu.json

clean:
	rm -rf $(DEMO) bench-data .pytest_cache .ruff_cache

.PHONY: docs figures

# The documentation site, strictly (a broken link, anchor, nav entry or API reference fails
# it) into site/: the tables of measured numbers are regenerated from benchmarks/*.json,
# research/*.json and weights/ first (scripts/docs_tables.py). tests/test_docs.py builds it
# too, so `make test` and CI fail on a broken site.
docs: setup
	$(PY) scripts/docs_tables.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The README's and the docs' pictures, from the current code and weights: the demo, then
# one of its scans drawn by ./evaluate show and its ranking figure, copied into docs/img/
# with the numbers printed beside them (scripts/docs_figures.py).
figures: demo
	$(PY) scripts/docs_figures.py --demo $(DEMO)
