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
"$PY" -m pip install -q "triton>=3.6,<3.10" numpy pytest pytest-benchmark hypothesis matplotlib tqdm ninja
"$PY" -m pip install -q --no-build-isolation -e .
export PY
