#!/usr/bin/env bash
# One GPU call: time the transformer forwards + VAE decode under several variants, then run the full FPS
# benchmark with the fastest. Usage (device machine): OUT=... bash benchmarks/run_variants.sh
set -u
export PYTHONUNBUFFERED=1
python benchmarks/fps.py --components-only --tag default --out "$OUT" 2>&1 | grep components:
python benchmarks/fps.py --components-only --tag default --fuse-qkv --out "$OUT" 2>&1 | grep components:
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python benchmarks/fps.py --components-only --tag notritongemm \
  --fuse-qkv --out "$OUT" 2>&1 | grep components:
best=$(python - "$OUT" <<'PY'
import glob, json, sys
recs = [json.load(open(f)) for f in glob.glob(sys.argv[1] + "/components_*.json")]
b = min(recs, key=lambda r: r["forward_sum_s"])
print(("--fuse-qkv " if b["fuse_qkv"] else "") + "--tag " + b["tag"] + " XLA=" + b["xla_flags"])
PY
)
echo "best: $best"
args=${best% XLA=*}; flags=${best#* XLA=}
XLA_FLAGS="$flags" python benchmarks/fps.py $args --out "$OUT" 2>&1 | grep -v -i warning | tail -6
