#!/usr/bin/env bash
# Builds the prototype into $OUT (default /tmp/onednn_wgrad): oneDNN 3.2 (GNU OpenMP build) and
# its headers from PyPI, XLA's FFI headers from the installed jaxlib, g++ (C++17).
set -euo pipefail
OUT=${OUT:-/tmp/onednn_wgrad}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT/wheels"
python3 -m pip download -q --no-deps -d "$OUT/wheels" \
  onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0
for w in "$OUT"/wheels/*.whl; do unzip -q -o "$w" -d "$OUT/unpacked"; done
INC=$(dirname "$(find "$OUT/unpacked" -path '*include/oneapi/dnnl/dnnl.hpp' | head -1)")/../..
LIB=$(dirname "$(find "$OUT/unpacked" -name 'libdnnl.so.3' | head -1)")
g++ -O2 -std=c++17 -shared -fPIC -w -I"$INC" -I"$($PY -c 'import jax; print(jax.ffi.include_dir())')" \
  "$(dirname "$0")/wgrad.cc" -L"$LIB" -ldnnl -Wl,-rpath,"$LIB" -o "$OUT/libonednn_wgrad.so"
echo "$OUT/libonednn_wgrad.so"
