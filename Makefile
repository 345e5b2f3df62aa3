# Two commands do everything: `make demo` and `make test`. Each creates (or reuses) the
# virtualenv in .venv from the locked CPU package set, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tip-ray-installed

.PHONY: install demo test test-all test-fast bench lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements/lock-cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, transformers, ray, deepspeed, vllm; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tip-ray prepare-demo
	$(VENV)/bin/tip-ray train

# CI runs `make test`: everything but the tests marked `heavy` (minute-long end-to-end scenarios:
# a killed driver's resume, the sweep, overlap mode, actors killed mid-run; repeats of covered
# checks under other ZeRO stages), which `make test-all` adds: on a 2-core machine without
# AVX-512 the whole suite took 35 minutes with the install, over CI's 30; `make test` about 26.
TEST_MARKERS ?= not heavy
test-all: TEST_MARKERS =
test test-all: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider -m "$(TEST_MARKERS)" --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/lean_loss_memory.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

lock:
	$(PYTHON) requirements/lock.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The wheels bench/gpu_check.py installs on the GPU machine (CPython 3.12, x86-64 manylinux, no
# network): DeepSpeed and what it imports that the machine's image lacks, at the CPU lock's
# versions. Carried there with the device tool's `carry: [".gpu_wheels"]` (docs/benchmarks.md).
GPU_WHEELS ?= .gpu_wheels
GPU_WHEEL_PINS = $(shell grep -iE '^(hjson|pydantic|pydantic-core|annotated-types|typing-inspection|typing-extensions)==' requirements/lock-cpu.txt)
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

.PHONY: gpu-wheels
gpu-wheels: | $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) \
		$$(grep -i '^deepspeed==' requirements/lock-cpu.txt)
	$(PY) bench/gpu_check.py --check-wheels $(GPU_WHEELS)
