# Two commands for a fresh machine (Python 3.10+):  make train   and   make test
# Both create .venv on first use and reinstall only when pyproject.toml changes.
# Then: .venv/bin/python train.py ..., .venv/bin/accelerate launch ... (or `source .venv/bin/activate`).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned for everything after it, so that no dependency swaps it for
# another build. Override for your platform, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# Extras of pyproject.toml ([project.optional-dependencies]) to install too, under the same torch pin:
# `make install EXTRAS=deepspeed,transformers`, `make train EXTRAS=deepspeed ARGS="..."`. Each extra is
# installed once (its own stamp, .venv/.install-<extra>) and again only when pyproject.toml changes.
# The `recipe` extra (your recipe's own packages) is always installed.
EXTRAS ?=
comma := ,
EXTRA_STAMPS := $(foreach e,$(sort $(subst $(comma), ,$(EXTRAS))),$(VENV)/.install-$(e))

.PHONY: train test test-quick bench lint format install install-test clean
# Every install goes into the one .venv: two pip runs at once (make -j) would step on each other.
.NOTPARALLEL:

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	touch $@

$(VENV)/.install: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[recipe]"
	touch $@

# One extra (test, bench, deepspeed, ...); a name that pyproject.toml does not declare is refused.
$(VENV)/.install-%: $(VENV)/.install pyproject.toml
	@awk -v e='$*' '/^\[/ { s = ($$0 == "[project.optional-dependencies]") } s && $$0 ~ "^" e "[ \t]*=" { f = 1 } END { exit !f }' pyproject.toml \
		|| { echo "EXTRAS: pyproject.toml declares no extra '$*' (see [project.optional-dependencies])" >&2; exit 2; }
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[$*]"
	touch $@

install: $(VENV)/.install $(EXTRA_STAMPS)
install-test: $(VENV)/.install-test

## Train the default recipe (seq2seq) on this machine; pass overrides with ARGS="key=value ..." (ARGS="recipe=gan")
train: install
	$(PY) train.py $(ARGS)

## The whole test suite, as CI runs it
test: install-test
	$(PY) -m pytest

## The quick subset for iteration: everything but the end-to-end launches
test-quick: install-test
	$(PY) -m pytest -m "not slow"

## Benchmarks against a hand-written loop, Accelerate and Lightning; writes BENCHMARKS.md and its raw
## results, BENCHMARKS.json (about 25 minutes on 2 cores). ARGS="--quick" for a short run; ARGS="--only gpu"
## on a GPU machine measures that section again and keeps the others (any sections, comma-separated).
bench: $(VENV)/.install-bench
	$(PY) -m bench $(ARGS)

lint: install-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint --failure-threshold style docker/Dockerfile docker/Dockerfile.cpu

format: install-test
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
