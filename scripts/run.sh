#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: FreeCure on the example reference
# photo. Extra arguments go to `freecure generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="outputs/example-$(date +%Y%m%d-%H%M%S)"
exec .venv/bin/freecure generate --backend token-fusion --tiny \
  --prompt "a woman with black curly hair, laughing happily" \
  --ref examples/astronaut.png --seed 0 --steps 50 --gamma 0.5 --out "$out" "$@"
