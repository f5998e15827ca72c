# OmniRay — the two commands: `make demo` (main job end to end) and `make test`.
.PHONY: setup demo demo-fresh test test-all lint format bench clean

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m jobs.demo $(ARGS)

demo-fresh: setup
	$(PY) -m jobs.demo --fresh $(ARGS)

# The default test run: CPU only, includes the slow end-to-end tests.
test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean:
	rm -rf data runs reports benchmarks/results .pytest_cache
