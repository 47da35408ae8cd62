#!/usr/bin/env bash
# A size slider on the demo model shipped inside loratool (offline, a few minutes on a laptop CPU):
# a concept pair → two copy-machine LoRAs → merge A:1 B:-1 → a -1..1 sweep (sheet.png, GIFs, sweep.json).
#
#   bash examples/slider_demo.sh [OUT]            # STEPS=20 SAMPLE_STEPS=4 for a quick look
#
# merge and sample take no --model: they read the base model the LoRAs recorded (demo) and say so.
set -euo pipefail
OUT=${1:-slider-demo}
STEPS=${STEPS:-300}
SAMPLE_STEPS=${SAMPLE_STEPS:-20}
LORATOOL=${LORATOOL:-loratool}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

# The pair: one scene, the shape large (plus, the slider's +1 end) and small (minus, its -1 end).
"$PYTHON" - "$OUT" <<'PY'
import sys
from loratool.demo.shapes import concept_pair

minus, plus, _, _ = concept_pair("size", 0)
plus.save(f"{sys.argv[1]}/plus.png")
minus.save(f"{sys.argv[1]}/minus.png")
PY

# Two copies with identical settings → $OUT/size_a.safetensors (plus) and $OUT/size_b.safetensors (minus).
# Copy mode's defaults (lr 1e-3, offset noise, a quarter of the steps from pure noise) make the copy render
# its image from any seed, not the seed's colours.
$LORATOOL train --pair "$OUT/plus.png" "$OUT/minus.png" -o "$OUT/size" --model demo --resolution 128 \
    --rank 8 --alpha 8 --steps "$STEPS" --check-every 0 --force

# The slider: plus at +1, minus at -1, re-factored exactly.
$LORATOOL merge "$OUT/size_a.safetensors:1" "$OUT/size_b.safetensors:-1" -o "$OUT/size_slider.safetensors" --force

# The sweep, in a scene without the word for size, from the first step: started later (--lora-start 0.25)
# a size slider keeps hue and shape more often, but on circle and triangle pairs it hardly moves (measured).
$LORATOOL sample --lora "$OUT/size_slider.safetensors" --slider -1..1 --points 5 --seeds 0,1 \
    --steps "$SAMPLE_STEPS" --prompt "a blue triangle on the left" -o "$OUT/sweep" --force
