#!/usr/bin/env bash
# One GPU call: VAE/transformer component timings with XLA's default conv layouts vs forced NHWC convolutions
# (the profile showed cuDNN NCHW<->NHWC conversion kernels in the VAE decode), then the full FPS run with the
# faster one. Usage (device machine): OUT=... bash benchmarks/run_conv_layout.sh
set -u
export PYTHONUNBUFFERED=1
python benchmarks/fps.py --components-only --tag default --out "$OUT" 2>&1 | grep components:
XLA_FLAGS=--xla_gpu_force_conv_nhwc=true python benchmarks/fps.py --components-only --tag nhwc --out "$OUT" 2>&1 \
  | grep components:
best=$(python benchmarks/pick_faster.py "$OUT" default nhwc)
echo "best: $best"
if [ "$best" = nhwc ]; then export XLA_FLAGS=--xla_gpu_force_conv_nhwc=true; fi
python benchmarks/fps.py --tag "$best" --out "$OUT" 2>&1 | grep -v -i warning | tail -4
