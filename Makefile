# Two commands do everything: `make demo` and `make test`. Each creates (or reuses) the
# virtualenv in .venv from the locked CPU package set, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tip-ray-installed

.PHONY: install demo test test-fast bench lint lock clean

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

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

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
