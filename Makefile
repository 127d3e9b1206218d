PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench gpu-check clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	OMP_NUM_THREADS=2 $(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo.py

bench: $(STAMP)
	$(PY) -m benchmarks.train_bench
	$(PY) -m benchmarks.eval_bench
	$(PY) -m benchmarks.crf_bench
	$(PY) -m benchmarks.help_bench

# The GPU check's dry run on this machine (tiny sizes on the CPU, no GPU number); on a GPU machine:
# bash benchmarks/gpu_check.sh OUTPUT_DIR (benchmarks/README.md).
gpu-check: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m benchmarks.gpu_check gpu_check_output --dry-run

clean:
	rm -rf outputs multirun lightning_logs demo_output gpu_check_output
