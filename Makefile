# fxassets: `make run` builds every effect on the embedded sample faces; `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := False
export DAGSTER_HOME ?= $(abspath .dagster_home)
PYTEST_ARGS ?=

.PHONY: setup setup-mobile run test ui bench exps clean remote push pull

# The pinned stack (constraints.txt): torch 2.14.1 + torchvision 0.29.1, dvc 3.67.1 and dagster 1.13.28 side by side.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "pip>=25"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[pipeline,test,scale]'
	@touch $@

setup: $(VENV)/.installed

# The phone runtimes of export.targets on top of the stack (`mobile` extra: ExecuTorch, Core ML tools; ~20 s; the
# LiteRT interpreter is in the stack). The LiteRT exporter (litert-torch) cannot be resolved beside the stack's pins: docs/mobile.md.
setup-mobile: setup
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[mobile]'

# Reproduce every effect with DVC (a second run is a no-op), then print the summary table. The effects build side by
# side, one `dvc repro --keep-going mobile_model@E` each (orchestration/build.py: one-thread trainings at once beat
# two-thread ones in turn on 2 cores; FXASSETS_JOBS=1 builds one at a time). An effect
# that fails (a gate, a stage error) does not stop the others; the table lists what built, then one line per effect
# that did not (the figure, the bound, what to change), and the exit status is non-zero. (REPORT: the table, after
# a build or a pull, keeping a failure's exit status.)
REPORT = mkdir -p .dvc/tmp; dvc status --json > .dvc/tmp/fxassets-status.json 2>/dev/null || echo '{}' > .dvc/tmp/fxassets-status.json; \
	echo; fxassets report --dvc-status .dvc/tmp/fxassets-status.json || rc=$${rc/\#0/1}; exit $$rc
run: setup
	@test -d .dvc || { git rev-parse --git-dir >/dev/null 2>&1 && dvc init -q || dvc init -q --no-scm; dvc config core.analytics false; }
	@rc=0; python -m orchestration.build $${FXASSETS_JOBS:+--jobs $$FXASSETS_JOBS} || rc=$$?; $(REPORT)

# Several machines, one DVC remote (docs/scale.md). `make remote URL=s3://bucket/prefix [ENDPOINT=http://host:port]`
# writes the remote into .dvc/config (commit it); credentials never go there: AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY in the environment, or `dvc remote modify --local storage access_key_id ...` (.dvc/config.local).
# `make push` after a build sends the outputs, the run-cache and the `cache: false` metrics; `make pull` on another
# clone restores every stage from the remote without computing one (a stage missing there fails), then the table.
REMOTE ?= storage
remote: setup
	@test -n "$(URL)" || { echo "usage: make remote URL=s3://bucket/prefix [ENDPOINT=http://host:port]" >&2; exit 2; }
	dvc remote add --force --default $(REMOTE) $(URL)
	@if [ -n "$(ENDPOINT)" ]; then dvc remote modify $(REMOTE) endpointurl $(ENDPOINT); fi

push: setup
	python -m orchestration.remote push

pull: setup
	@rc=0; FXASSETS_ONLY_STAGE=none dvc repro --pull --keep-going || rc=$$?; $(REPORT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The Dagster UI on http://127.0.0.1:3000 (same stages, driven through DVC).
# The instance config (orchestration/dagster.yaml: telemetry off, one run per effect at a time) is copied once;
# `dagster instance migrate` first, so the webserver, daemon and code server don't race to create the database.
UI_PORT ?= 3000
ui: setup
	@mkdir -p $(DAGSTER_HOME)
	@test -f $(DAGSTER_HOME)/dagster.yaml || cp orchestration/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	@dagster instance migrate >/dev/null
	dagster dev -m orchestration.definitions -h 127.0.0.1 -p $(UI_PORT)

bench: setup
	fxassets bench

# `dvc exp show` readable: the params that differ between the experiments and the figures that moved (metrics/),
# without the dependency md5 columns (README, "Experiments")
exps: setup
	dvc exp show --only-changed --drop '.*/'

clean:
	rm -rf data/prompts data/teacher_images data/face_pairs data/student data/mobile
