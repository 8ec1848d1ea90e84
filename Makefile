# storyflow — `make demo` runs the flagship workflow offline; `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dask]'
	$(BIN)/python -m compileall -q cli  # bytecode for the editable package, even with PYTHONDONTWRITEBYTECODE
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/storyflow run workflows/short-story.yaml
	@id=$$($(BIN)/storyflow runs --limit 1 --json | $(BIN)/python -c "import json,sys; print(json.load(sys.stdin)[0]['run_id'])"); \
	  echo; $(BIN)/storyflow show $$id --output story | head -12; echo "[…]"

test: $(STAMP)
	$(BIN)/check-jsonschema --schemafile schemas/workflow.schema.json workflows/*.yaml
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cli tests bench
	$(BIN)/mypy

bench: $(STAMP)
	-$(BIN)/python bench/bench_cli.py  # exits 1 on a missed goal; the others still run
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_fork.py
	$(BIN)/python bench/bench_diff.py
	$(BIN)/python bench/bench_llm.py
	$(BIN)/python bench/bench_dask.py

clean:
	rm -rf $(VENV) .storyflow build dist .pytest_cache .mypy_cache .ruff_cache
