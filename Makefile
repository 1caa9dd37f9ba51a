# Two commands do all set-up on a fresh machine:
#   make run    build the demo model, export it into models/, serve it on 127.0.0.1:8000
#   make test   lint and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint bench gpu-check venv clean system-deps zoo zoo-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	# torch is pinned to the CPU build (==2.13.0) in pyproject.toml; never a CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[export,test]'
	rm -f $(VENV)/.installed-*
	touch $@

# The architecture zoo (tests/test_zoo.py, make zoo) needs torchvision and timm. Both go in with
# --no-deps, so pip never swaps the CPU torch for a CUDA build; their small needs (pillow, pyyaml)
# and the anchor tools `make zoo` compares against come from pyproject's `zoo` extra.
# (timm's declared huggingface_hub/safetensors only download weights: not needed here.)
ZOO_PINS := torchvision==0.28.* timm==1.0.31
ZOO_STAMP := $(VENV)/.zoo-$(shell echo '$(ZOO_PINS)' | cat - pyproject.toml | sha1sum | cut -c1-12)

zoo-deps: $(ZOO_STAMP)

$(ZOO_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[zoo]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(foreach p,$(ZOO_PINS),'$(p)')
	rm -f $(VENV)/.zoo-*
	touch $@

run: $(STAMP)
	$(BIN)/python -m export demo --repository models
	@$(BIN)/python -m service.examples --repository models --url http://$(HOST):$(PORT)
	$(BIN)/python -m service --repository models --host $(HOST) --port $(PORT) --log-format text

# Real tools the tests drive: Debian's chromium (browser test), docker-compose (`config` of every
# profile), nginx (`nginx -t`), promtool, docker.io + debootstrap (the engine test builds the
# images and runs compose, ~4 min), and libb64 for Triton's perf_analyzer (fetched from PyPI by
# benchmarks/perf_analyzer.py). Without root or apt their tests skip, with a reason.
SYSTEM_TOOLS := chromium chromedriver docker-compose nginx promtool dockerd debootstrap
SYSTEM_LIBRARIES := libb64.so.0d
SYSTEM_PACKAGES := chromium chromium-driver docker-compose nginx-light prometheus docker.io debootstrap libb64-0d
system-deps:
	@missing=; for tool in $(SYSTEM_TOOLS); do \
	  command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || missing=1; done; \
	for library in $(SYSTEM_LIBRARIES); do \
	  /sbin/ldconfig -p 2>/dev/null | grep -q $$library || missing=1; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && \
	    apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; } || \
	  echo "could not install $(SYSTEM_PACKAGES): their tests will skip"; \
	else echo "missing some of $(SYSTEM_TOOLS) and cannot install them: their tests will skip"; fi

test: $(STAMP) $(ZOO_STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# Benchmarks print tables (about 15 minutes in all; the first run exports the ResNet-18-sized
# model into artifacts/bench and builds a separate venv for the KServe peer).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.overhead
	$(BIN)/python -m benchmarks.phases
	$(BIN)/python -m benchmarks.serving
	$(BIN)/python -m benchmarks.load
	$(BIN)/python -m benchmarks.faults
	$(BIN)/python -m benchmarks.perf_analyzer
	$(BIN)/python -m benchmarks.drift_cost

# On a machine with an NVIDIA GPU, from a fresh checkout (< 8 min; see README "GPU check").
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

# Every architecture of the zoo (about 40 torchvision and timm models, ~15 min on 2 quiet cores):
# exported, checked against PyTorch float64, and compared with the anchor tools. Prints a table.
zoo: $(ZOO_STAMP)
	$(BIN)/python -m benchmarks.zoo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
