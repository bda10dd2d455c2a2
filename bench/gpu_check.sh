#!/usr/bin/env bash
# The one prepared GPU check (9.5 minutes at most, one call): device and versions, the CUDA tests
# (`pytest -m cuda tests/test_cuda.py`: compiled kernels, CUDA graphs, the cascade choice, the
# torch backend and ORT's CUDA provider against their references), the kernel checks and timings
# with the cascade crossover that sets use_cascade (bench/gpu_kernels.py), then end to end
# (bench/gpu_e2e.py: float32 checks against PEFT with their mutation self-test, then bf16 timings).
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root; results in $OUT
#   bash bench/gpu_check.sh --cpu-smoke     # the same steps on a CPU machine (tiny sizes, Triton
#                                           # interpreter; the CUDA tests are collected and skipped)
#
# Installs this checkout editable without dependencies (`pip install --no-deps -e .`) unless
# `softprompt` already imports from it; where that install fails, the checkout is imported through a
# temporary folder of links (a failed install leaves an installed copy as it was).
# Extra arguments go to both Python scripts. PYTHON, TESTS_TIMEOUT (150 s), KERNELS_TIMEOUT (150 s)
# and E2E_TIMEOUT (240 s) can be overridden.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
OUT="${OUT:-$(mktemp -d)}"
export OUT
mkdir -p "$OUT"

# `import softprompt.<part>` must resolve to this checkout's folders (runtime/, prefix_kernels/, models/,
# export/, bench/), which pyproject.toml maps on install. tests/ holds tolerances.py and tiny.py.
export PYTHONPATH="$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
from_checkout() {  # softprompt.kernels and softprompt.models import from this checkout
    "$PYTHON" - "$ROOT" >/dev/null 2>&1 <<'EOF'
import os, sys
import softprompt.kernels as k, softprompt.models as m
root = os.path.realpath(sys.argv[1]) + os.sep
sys.exit(0 if all(os.path.realpath(p.__file__).startswith(root) for p in (k, m)) else 1)
EOF
}
if ! from_checkout; then
    echo "=== installing this checkout: pip install -q --no-deps -e ."
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" \
        || echo "pip install -e failed (see above); an installed copy, if any, is left as it was"
fi
if ! from_checkout; then  # no pip or setuptools: a folder of links laid out as the install maps it
    LINKS="$(mktemp -d)"
    "$PYTHON" - "$ROOT" "$LINKS" <<'EOF'
import os, sys
root, links = sys.argv[1:]
parts = {"runtime": "runtime", "kernels": "kernels", "models": "models", "export": "export",
         "bench": "bench"}
try:  # the mapping itself, where tomllib exists (Python >= 3.11)
    import tomllib
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    parts = {k.split(".")[1]: v for k, v in dirs.items() if k.count(".") == 1}
except (ImportError, KeyError):
    pass
pkg = os.path.join(links, "softprompt")
os.mkdir(pkg)
for name in os.listdir(os.path.join(root, "softprompt")):
    os.symlink(os.path.join(root, "softprompt", name), os.path.join(pkg, name))
for part, folder in parts.items():
    os.symlink(os.path.join(root, folder), os.path.join(pkg, part))
EOF
    export PYTHONPATH="$LINKS:$PYTHONPATH"
    echo "softprompt imported through $LINKS (links into this checkout)"
fi

echo "=== device"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
else
    echo "nvidia-smi: not found"
fi
(cd "${TMPDIR:-/tmp}" && "$PYTHON" - <<'EOF'  # not from $ROOT: its softprompt/ would shadow the links
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
) || echo "import softprompt.kernels failed (see above): install the checkout (pip install --no-deps -e .)"

status=0
echo "=== CUDA tests: pytest -m cuda tests/test_cuda.py (skipped, with the reason, without a GPU)"
if "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
    timeout "${TESTS_TIMEOUT:-150}" "$PYTHON" -m pytest -m cuda tests/test_cuda.py -q -rs \
        -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml" || status=$?
else
    echo "pytest is not installed: the CUDA tests did not run (pip install pytest)"
    status=1
fi

echo "=== kernels: checks against the reference, then timings and the cascade crossover"
timeout "${KERNELS_TIMEOUT:-150}" "$PYTHON" bench/gpu_kernels.py --out "$OUT/kernels.json" "$@" || status=$?

if [ -f bench/gpu_e2e.py ]; then
    echo "=== end to end"
    timeout "${E2E_TIMEOUT:-240}" "$PYTHON" bench/gpu_e2e.py --out "$OUT/e2e.json" "$@" || status=$?
else
    echo "=== end to end: bench/gpu_e2e.py not present, skipped"
fi
echo "=== results in $OUT: $(ls "$OUT" | tr '\n' ' ')(exit status $status)"
exit "$status"
