# entcal: `make run` sets up and runs the main job, `make test` sets up and runs the checks.
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/compare

.PHONY: setup run test lint format

setup:
	@bash scripts/setup.sh

# The main job: every default decoder on the embedded SmolLM2-135M and pydoc corpus (32 prompts,
# 128-token continuations: under 10 minutes on 2 cores); results in $(OUT)/report.md.
run: setup
	$(BIN)/entcal compare --n 32 --length 128 --out $(OUT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q -rs
