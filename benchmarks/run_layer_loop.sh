#!/usr/bin/env bash
# One GPU call: are the 40 blocks faster from per-layer weight arrays than from one lax.scan over stacked weights?
# (Inside the scan XLA copies each layer's weight slice before its matmuls: the MemcpyD2D of the chunk profile.)
# Component timings for scan and split (pipe.unstack_transformer_layers()), then the full FPS run (both settings)
# with split. Usage (device machine, repo root): OUT=... bash benchmarks/run_layer_loop.sh
set -u
export PYTHONUNBUFFERED=1
for v in scan split; do
  timeout 120 python benchmarks/fps.py --components-only --layer-loop "$v" --tag "$v" --out "$OUT" 2>&1 \
    | grep -E "components:|device:|Error"
done
python benchmarks/pick_faster.py "$OUT" scan split || true
timeout 240 python benchmarks/fps.py --layer-loop split --tag split --out "$OUT" 2>&1 | grep -v -i warning | tail -4
