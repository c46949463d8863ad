#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: PhotoMaker + FreeCure on the example
# reference photo, with the released weights (CUDA GPU and Hugging Face Hub access needed;
# about 7.9 GB is downloaded on the first run). Where either is missing, the same job runs on
# tiny random-weight components (--tiny) and says so. Extra arguments go to `freecure generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="outputs/photomaker-astronaut-$(date +%Y%m%d-%H%M%S)"
job=(generate --backend photomaker --ref examples/astronaut.png
     --prompt "a woman img with red long straight hair, wearing sunglasses, laughing happily"
     --seed 0 --steps 50 --gamma 0.5 --out "$out")
if reason=$(.venv/bin/python scripts/can_run_real.py TencentARC/PhotoMaker); then
  exec .venv/bin/freecure "${job[@]}" "$@"
fi
echo "freecure: $reason; running the same job with --tiny (random weights: the images are noise)." >&2
exec .venv/bin/freecure "${job[@]}" --tiny "$@"
