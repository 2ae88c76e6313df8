#!/usr/bin/env bash
# One GPU call: does XLA's dynamic-slice fusion remove the per-layer MemcpyD2D of the stacked block weights?
# Component timings with the current defaults vs --xla_gpu_enable_dynamic_slice_fusion=true, a kernel profile of
# the fused variant (to count the MemcpyD2D left), then the full FPS run (both settings) with the faster one.
# Usage (device machine, repo root): OUT=... bash benchmarks/run_slice_fusion.sh
set -u
export PYTHONUNBUFFERED=1
DSF=--xla_gpu_enable_dynamic_slice_fusion=true
python benchmarks/fps.py --components-only --tag default --out "$OUT" 2>&1 | grep -E "components:|device:"
XLA_FLAGS=$DSF python benchmarks/fps.py --components-only --tag dsf --out "$OUT" 2>&1 | grep -E "components:|Error"
XLA_FLAGS=$DSF python benchmarks/profile_chunk.py --out "$OUT/prof_dsf" 2>&1 | grep -v -i warning | tail -12
best=$(python benchmarks/pick_faster.py "$OUT" default dsf)
echo "best: $best"
if [ "$best" = dsf ]; then export XLA_FLAGS=$DSF; fi
python benchmarks/fps.py --tag "$best" --out "$OUT" 2>&1 | grep -v -i warning | tail -4
