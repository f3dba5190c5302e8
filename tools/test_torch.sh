#!/usr/bin/env bash
# Runs the README's test command (tools/test.sh) on the committed HEAD against another torch
# release, so that the range pyproject.toml declares (torch 2.11 to 2.14) is checked, not assumed:
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
"$work/venv/bin/python" -m pip install -q "torch==$version"
rm -rf "$work/src"
git clone -q "$root" "$work/src"
if [ "${RNNKERNELS_NO_CUDA:-0}" != 1 ] && command -v nvcc >/dev/null; then
  headers=$(find "$work/venv" -path '*/nvidia/*/include/cusparse.h' -print -quit)
  [ -n "$headers" ] && export CPATH="$(dirname "$headers")${CPATH:+:$CPATH}"
  [ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
# tools/setup.sh takes the python3 on PATH when it has torch: the venv's.
export PATH="$work/venv/bin:$PATH"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
exec bash "$work/src/tools/test.sh" -p no:cacheprovider "$@"
