#!/usr/bin/env bash
# Runs the test suite of the committed HEAD against another torch release, so that the range
# pyproject.toml declares (torch 2.11 to 2.14) is checked, not assumed:
#
#   bash tools/test_torch.sh 2.11.0 python3.12    # the GPU machine's torch, triton and Python
#   bash tools/test_torch.sh 2.14.1               # extra arguments after the Python go to pytest
#
# Its own venv and clone under ${TMPDIR:-/tmp}/rnnkernels-torch<version> (the checkout's build
# and .venv are left alone). PyPI's torch for Linux is a CUDA build: where nvcc is found, the
# CUDA extension is built as on the GPU machine (sm_90 only), with the CUDA library headers of
# the wheel's nvidia packages; the CUDA tests skip without a GPU, the Triton kernels run in the
# interpreter. RNNKERNELS_NO_CUDA=1 builds the CPU kernels only.
set -euo pipefail
version=${1:?usage: bash tools/test_torch.sh TORCH_VERSION [PYTHON] [PYTEST_ARGS...]}
python=${2:-python3}
shift $(( $# < 2 ? $# : 2 ))
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${TMPDIR:-/tmp}/rnnkernels-torch$version
mkdir -p "$work"
[ -x "$work/venv/bin/python" ] || "$python" -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install -q "torch==$version" "triton>=3.6,<3.10" numpy pytest pytest-benchmark \
  hypothesis matplotlib tqdm ninja setuptools wheel
# triton 3.6's interpreter turns one-element arrays into Python ints, which numpy 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars").
if "$py" -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2]))
>= (3, 7))"; then
  "$py" -m pip install -q "numpy<2.4"
fi
"$py" -c "import torch, triton, numpy, sys; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

rm -rf "$work/src"
git clone -q "$root" "$work/src"
cd "$work/src"
if [ "${RNNKERNELS_NO_CUDA:-0}" != 1 ] && command -v nvcc >/dev/null; then
  headers=$(find "$work/venv" -path '*/nvidia/*/include/cusparse.h' -print -quit)
  [ -n "$headers" ] && export CPATH="$(dirname "$headers")${CPATH:+:$CPATH}"
  [ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
"$py" -m pip install -q --no-build-isolation --no-deps -e .
TRITON_INTERPRET=1 exec "$py" -m pytest -q -p no:cacheprovider tests "$@"
