# The two set-up commands: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.clipseek-installed
DEV := $(VENV)/.clipseek-dev-installed
DEMO_DIR ?= .demo
DEMO_QUERY ?= a large red circle
DEMO_PAIR_QUERY ?= a small purple cross at the top and a large green circle at the bottom over a night background
DEMO_QUERY_ZH ?= 右边的大红圆

.PHONY: demo test lint bench bench-10m gpu-check gpu-wheels install install-check clean

install: $(BASE)

# The demo needs clipseek alone; the tests, lint and bench need the dev extra too.
$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $(BASE)

$(DEV): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(DEV) $(BASE)

# Generate a demo library, index it and its captions with the bundled demo model (an index of
# its own under $(DEMO_DIR)/home), then search it: text → image, image → caption, then in
# Chinese: the English captions, then the pictures; then one two-object query without and with
# re-ranking by the demo matcher.
demo: export CLIPSEEK_HOME = $(abspath $(DEMO_DIR))/home
demo: $(BASE)
	rm -rf $(DEMO_DIR)
	$(BIN)/clipseek demo $(DEMO_DIR)/library --count 200 --pairs 20
	$(BIN)/clipseek index $(DEMO_DIR)/library --model demo
	$(BIN)/clipseek add-captions $(DEMO_DIR)/library/captions.jsonl --collection demo
	$(BIN)/clipseek status
	$(BIN)/clipseek search "$(DEMO_QUERY)" -k 5
	$(BIN)/clipseek search --image "$$($(BIN)/clipseek search "$(DEMO_QUERY)" -k 1 --paths)" --texts -k 3
	$(BIN)/clipseek search "$(DEMO_QUERY_ZH)" --texts -k 3
	$(BIN)/clipseek search "$(DEMO_QUERY_ZH)" -k 5
	$(BIN)/clipseek search "$(DEMO_PAIR_QUERY)" -k 3
	$(BIN)/clipseek search "$(DEMO_PAIR_QUERY)" -k 3 --rerank

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Test files run in parallel on every core, each file on one worker (its module fixtures built
# once). The Ray tests run after them, alone: a local Ray is a dozen processes, and beside another
# test file on two cores its tests took four times as long (274 s against 67 s alone). Both runs
# share one model cache (CLIPSEEK_TEST_CACHE), so that the demo model is exported once.
test: lint
	cache=$$(mktemp -d) && trap 'rm -rf "$$cache"' EXIT && export CLIPSEEK_TEST_CACHE=$$cache && \
	$(BIN)/python -m pytest -n auto --dist loadfile --ignore tests/test_ray.py && \
	$(BIN)/python -m pytest tests/test_ray.py

bench: $(DEV)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m tests.bench --out bench-report.json --markdown bench-report.md --readme README.md

# The long one, on demand: 10,000,000 vectors through the store as IVF-PQ in 4 GiB (two hours or more on 2 cores,
# ~36 GB of scratch disk, in BENCH_DIR when given, else the system's temporary folder). With BENCH_KEEP=FOLDER
# the index is kept there, and a run with the same FOLDER measures its queries again (seconds to minutes);
# BENCH_REBUILD=1 builds the kept index's files anew first (an hour at 10M, the catalog's load spared).
bench-10m: $(DEV)
	$(BIN)/python -m tests.bench.ann_10m --out bench-10m-report.json $(if $(BENCH_DIR),--dir $(BENCH_DIR)) \
		$(if $(BENCH_KEEP),--keep $(BENCH_KEEP)) $(if $(BENCH_REBUILD),--rebuild)

# Indexing on a GPU (tests/bench/gpu_check.py): the report goes to $(OUT), else gpu-check/. On a
# machine without the network, run tests/bench/gpu_check.sh with the wheels of gpu-wheels/ instead.
gpu-check: $(DEV)
	OUT=$${OUT:-gpu-check} $(BIN)/python -m tests.bench.gpu_check

# The wheels gpu_check.sh installs (tests/bench/gpu_wheels.py), for the GPU machine's Python:
# make gpu-wheels GPU_PYTHON=3.12
gpu-wheels: $(DEV)
	$(BIN)/python -m tests.bench.gpu_wheels $(if $(GPU_PYTHON),--python-version $(GPU_PYTHON))
	du -sh gpu-wheels

# A new user's install: clipseek alone (no extras) in a fresh venv from this checkout. The demo
# model indexes and searches, and `serve` and a multilingual model say which extra they need.
install-check:
	rm -rf .install-check && $(PYTHON) -m venv .install-check/venv
	.install-check/venv/bin/python -m pip install --quiet .
	cd .install-check && export CLIPSEEK_HOME=$$PWD/home && \
	  venv/bin/clipseek demo library --count 20 && \
	  venv/bin/clipseek index library --model demo && \
	  venv/bin/clipseek search "a red circle" -k 1 && \
	  venv/bin/clipseek search "红色的圆" -k 1 && \
	  ! venv/bin/clipseek serve 2> serve.err && grep "pip install 'clipseek\[server\]'" serve.err && \
	  ! venv/bin/clipseek index library --model xlm-roberta-base-ViT-B-32 --pretrained laion5b_s13b_b90k \
	    --index multilingual 2> hf.err && grep "pip install 'clipseek\[hf\]'" hf.err
	rm -rf .install-check

clean:
	rm -rf $(DEMO_DIR) .install-check gpu-check .gpu-venv bench-report.json bench-report.md bench-10m-report.json .pytest_cache .ruff_cache
