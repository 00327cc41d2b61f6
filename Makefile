# entcal: `make run` sets up and runs the main job, `make test` sets up and runs the checks.
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/compare

.PHONY: setup run test lint format

setup:
	@bash scripts/setup.sh

run: setup
	$(BIN)/python examples/quickstart.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q -rs
