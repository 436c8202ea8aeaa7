#!/usr/bin/env bash
# The GPU suite on a device machine (docs/gpu-suite.md): install what `make gpu-wheels` packed and the
# earlier calls carried into .gpu/ (onnxruntime-gpu's pieces, base/: wheels, Fashion-MNIST, manifest) to
# /tmp/site, then run bench/gpu_suite.py with its records in bench/results and copied to $OUT.
# Extra arguments go to gpu_suite.py, e.g. --stages train,quality or --budget-s 480.
#
#   BARLOW_COMMIT=<sha> bash bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-suite-out}"
export PYTHONUNBUFFERED=1
echo "$(date -u +%FT%TZ) $(python3 --version) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
exec python3 bench/gpu_suite.py --carried .gpu --site /tmp/site --out "$out" "$@"
