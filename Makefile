# vggdist — `make demo` runs the main job on embedded defaults, `make test` runs the test suite.
# Both create/update .venv first (the install order is explained in README.md, "Install").
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo study bench bench-full lint clean

setup: $(STAMP)

# Re-run the install whenever the dependency list changes; a no-op otherwise.
$(STAMP): pyproject.toml constraints.txt setup.py vggdist/_jpegcrop.c preprocess/_moments.c scripts/install_pillow_simd.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# every step under constraints.txt: the exact versions the cluster nodes install too
	# 1. torch + torchvision as a pair (from this machine's disk; pip only, not uv/poetry)
	$(PIP) install -q -c constraints.txt torch torchvision
	# 2-3. the rest, then this project in editable mode with its dev extras
	$(PIP) install -q -c constraints.txt "ray[default,train]" webdataset mlflow
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# 4. pillow-simd last (it replaces Pillow; anything installed later may bring Pillow back)
	bash scripts/install_pillow_simd.sh $(BIN)/python
	@touch $(STAMP)

# Fashion-MNIST (Debian package) lets the shortened-demo and grad-compression tests use the demo's real data;
# without it they skip / fall back to generated images. Chromium (Debian package) runs the MLflow UI test,
# PostgreSQL (Debian package) the test of MLflow on PostgreSQL as cluster.yaml runs it.
test: setup
	@bash scripts/install_fashion_mnist.sh || echo "continuing without Fashion-MNIST"
	@bash scripts/install_chromium.sh || echo "continuing without Chromium (the MLflow UI test skips)"
	@bash scripts/install_postgresql.sh || echo "continuing without PostgreSQL (the MLflow-on-PostgreSQL test skips)"
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	@bash scripts/install_fashion_mnist.sh || true
	$(BIN)/vggdist demo $(DEMO_ARGS)

# The reduced-scale reproduction: all of Fashion-MNIST, `--plan study` (~90 min on 2 CPU cores); rerun to resume.
study: setup
	@bash scripts/install_fashion_mnist.sh || true
	$(BIN)/vggdist demo --plan study --workdir study-work $(STUDY_ARGS)

# Every benchmark, then docs/performance.md regenerated from bench/results/*.json.
bench: setup
	$(BIN)/python bench/run_all.py --quick
	$(BIN)/python bench/render.py

bench-full: setup
	$(BIN)/python bench/run_all.py
	$(BIN)/python bench/render.py

lint: setup
	$(BIN)/ruff check vggdist preprocess jobs bench tests

clean:
	rm -rf $(VENV) build *.egg-info
