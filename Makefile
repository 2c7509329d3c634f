# The two set-up commands: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clipseek-installed
DEMO_DIR ?= .demo
DEMO_QUERY ?= a large red circle

.PHONY: demo test lint bench bench-10m install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Generate a demo library, index it and its captions with the bundled demo model (an index of
# its own under $(DEMO_DIR)/home), then search it: text → image, then image → caption.
demo: export CLIPSEEK_HOME = $(abspath $(DEMO_DIR))/home
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/clipseek demo $(DEMO_DIR)/library --count 200
	$(BIN)/clipseek index $(DEMO_DIR)/library --model demo
	$(BIN)/clipseek add-captions $(DEMO_DIR)/library/captions.jsonl --collection demo
	$(BIN)/clipseek status
	$(BIN)/clipseek search "$(DEMO_QUERY)" -k 5
	$(BIN)/clipseek search --image "$$($(BIN)/clipseek search "$(DEMO_QUERY)" -k 1 --paths)" --texts -k 3

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m tests.bench --out bench-report.json

# The long one, on demand: 10,000,000 vectors through the store as IVF-PQ in 4 GiB (~20 min,
# ~25 GB of scratch disk, in BENCH_DIR when given, else the system's temporary folder).
bench-10m: $(STAMP)
	$(BIN)/python -m tests.bench.ann_10m --out bench-10m-report.json $(if $(BENCH_DIR),--dir $(BENCH_DIR))

clean:
	rm -rf $(DEMO_DIR) bench-report.json bench-10m-report.json .pytest_cache .ruff_cache
