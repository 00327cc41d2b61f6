# entcal: `make run` sets up and runs the main job, `make test` sets up and runs the checks.
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/compare

.PHONY: setup run test lint format

setup:
	@bash scripts/setup.sh

# The main job: every default decoder (the calibrated and anchored ones included) on the embedded SmolLM2-135M
# and the test split of the pydoc corpus, which the shipped predictor never saw (32 prompts,
# 128-token continuations); results in $(OUT)/report.md.
run: setup
	$(BIN)/entcal compare --split test --n 32 --length 128 --out $(OUT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q -rs
