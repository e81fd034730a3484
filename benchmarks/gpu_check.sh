#!/usr/bin/env bash
# The GPU checks of the kernels in one prepared run, for a machine with a CUDA device and an
# installed CUDA torch (e.g. the project's lent GPU machine, which cannot download anything):
#
#   bash benchmarks/gpu_check.sh            # logs and tables into $OUT (default: ./gpu-check)
#
# Installs mtcore without dependencies (they must be there already), builds the C++/CUDA
# extension, runs the kernel tests (the `gpu`-marked CUDA cases and the Triton tests, compiled
# rather than interpreted), then the kernel benchmarks (`mtcore bench` picks the GPU). Each part
# runs even if an earlier one failed; the exit status is the first failure's. On a machine
# without CUDA it runs the same parts on the CPU (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MTCORE_CACHE="${MTCORE_CACHE:-$(mktemp -d)/mtcore-cache}"
PY="${PYTHON:-python3}"
status=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember the first failure
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

step env "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU dry run)')"
step install "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step build "$PY" -m mtcore.cli.main build-ext
# the backends a GPU run is for must be there: a missing one would only skip its tests
step backends "$PY" -c "import torch; from mtcore import kernels as K; \
dev = 'cuda' if torch.cuda.is_available() else 'cpu'; have = K.available_backends(dev); \
want = {'cuda', 'triton'} if dev == 'cuda' else {'cpp'}; print(dev, have); \
assert want <= set(have), f'kernel backends missing on {dev}: {sorted(want - set(have))}'"
step tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m "not slow" -ra
step bench "$PY" -m mtcore.cli.main bench --markdown
echo "gpu_check: exit $status (logs in $OUT)"
exit "$status"
