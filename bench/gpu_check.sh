#!/usr/bin/env bash
# The one prepared GPU check (about 6 minutes at most): device and versions, the kernel checks and
# timings (bench/gpu_kernels.py), then the end-to-end benchmark (bench/gpu_e2e.py) if it exists.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root; results in $OUT
#   bash bench/gpu_check.sh --cpu-smoke     # the same steps on a CPU machine (tiny sizes, Triton interpreter)
#
# Installs nothing: `softprompt` is imported from this checkout (PYTHONPATH).
# Extra arguments go to both Python scripts. PYTHON, KERNELS_TIMEOUT and E2E_TIMEOUT can be overridden.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
OUT="${OUT:-$(mktemp -d)}"
export OUT
mkdir -p "$OUT"

# `import softprompt.<sub>` resolves to this checkout's folders without pip: softprompt/__init__.py
# adds the checkout root to the package's search path (pyproject maps the folders on install).
export PYTHONPATH="$ROOT:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"

echo "=== device"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
else
    echo "nvidia-smi: not found"
fi
("$PYTHON" - <<'EOF'
import platform, torch
import softprompt.kernels as k
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"triton {tv}  device: {dev}")
print(f"softprompt.kernels from {k.__path__[0]}")
EOF
) || echo "import softprompt.kernels failed (see above); gpu_kernels.py falls back to loading kernels/ by path"

status=0
echo "=== kernels: checks against the reference, then timings"
timeout "${KERNELS_TIMEOUT:-210}" "$PYTHON" bench/gpu_kernels.py --out "$OUT/kernels.json" "$@" || status=$?

if [ -f bench/gpu_e2e.py ]; then
    echo "=== end to end"
    timeout "${E2E_TIMEOUT:-150}" "$PYTHON" bench/gpu_e2e.py --out "$OUT/e2e.json" "$@" || status=$?
else
    echo "=== end to end: bench/gpu_e2e.py not present, skipped"
fi
echo "=== results in $OUT: $(ls "$OUT" | tr '\n' ' ')(exit status $status)"
exit "$status"
