# One place for the everyday commands. `make install` creates .venv with the package (editable).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data train test test-fast lint format clean

$(BIN)/mrl-train: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision first, with pip (they lie on the build machines' disk); the tested versions of
	# everything come from constraints.txt, the package itself only asks for compatible ranges
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

install: $(BIN)/mrl-train

# The embedded default data set, from Debian's package (needs root; skipped when already present).
data: $(FMNIST)
$(FMNIST):
	@if command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Install Fashion-MNIST (see docs/data.md) or run: mrl-train data.download=true"; exit 1; fi

# The embedded default job: MRL on Fashion-MNIST on the CPU.
train: install data
	$(BIN)/mrl-train $(ARGS)

# Everything, the slow end-to-end tests included (what CI runs), in TEST_WORKERS processes (pytest-xdist;
# each test file stays in one, so its shared runs are made once): most tests wait on one single-threaded
# command, so a 2-core machine runs two at once.
TEST_WORKERS ?= 2
test: install data
	$(BIN)/pytest -m "slow or not slow" -n $(TEST_WORKERS) --dist loadfile --durations=20 $(ARGS)

# The fast suite, for the edit-test loop.
test-fast: install
	$(BIN)/pytest $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) logs .pytest_cache .ruff_cache
