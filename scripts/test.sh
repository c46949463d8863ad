#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite offline.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k masks`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
