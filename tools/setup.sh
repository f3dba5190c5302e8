# Sourced by tools/test.sh and tools/bench.sh: puts a Python with torch, triton and the built
# package on PATH. Uses the system Python when it already has torch (the GPU machine: its CUDA
# build of torch), else a .venv with the CPU build of torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if python3 -c "import torch" 2>/dev/null; then
  PY=python3
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  PY=.venv/bin/python
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
fi
# setuptools and wheel: the build below runs without isolation (a Python 3.12 venv has neither).
"$PY" -m pip install -q "triton>=3.6,<3.10" numpy pytest pytest-benchmark hypothesis matplotlib \
  tqdm ninja setuptools wheel
# triton 3.6 (torch 2.11's) has an interpreter that turns one-element arrays into Python ints,
# which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"):
# where the tests will run that interpreter (no GPU), numpy 2.4 or later is replaced.
# torch is imported only for such a pair (an import costs seconds on every setup).
if "$PY" - <<'EOF'
import sys

import numpy
import triton


def version(v):
    return tuple(int(x) for x in v.split(".")[:2])


if version(triton.__version__) >= (3, 7) or version(numpy.__version__) < (2, 4):
    sys.exit(1)
import torch  # noqa: E402

sys.exit(torch.cuda.is_available())
EOF
then
  "$PY" -m pip install -q "numpy<2.4"
fi
"$PY" -m pip install -q --no-build-isolation -e .
export PY
