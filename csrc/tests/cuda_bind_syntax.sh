#!/usr/bin/env bash
# Compile-checks csrc/cuda_bind.cpp (g++ -fsyntax-only -Wall -Wextra -Werror) against the headers
# of the installed torch and of the CUDA toolkit, on a machine whose torch has no CUDA: the CPU
# wheel ships ATen's CUDA headers but not the cuBLAS / cuSPARSE / cuSOLVER headers they include
# (nor c10's generated cuda_cmake_macros.h), so those are replaced by stubs that declare their
# opaque handle types. The binding itself calls none of these libraries directly.
# Usage: cuda_bind_syntax.sh PYTHON CUDA_INCLUDE_DIR CXX. Last line: "N passed, M failed".
set -uo pipefail
py=$1
cuda_include=$2
cxx=$3
root=$(cd "$(dirname "$0")/../.." && pwd)
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT

mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n' > "$stub/cusparse.h"
printf '#pragma once\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n' > "$stub/cublas_v2.h"
printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' > "$stub/cublasLt.h"
printf '#pragma once\ntypedef int cusolverStatus_t;\n' > "$stub/cusolver_common.h"
printf '#pragma once\n#include "cusolver_common.h"\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n' > "$stub/cusolverDn.h"

includes=()
for dir in $("$py" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))") \
           $("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])") "$cuda_include" "$stub"; do
  includes+=(-isystem "$dir")
done
# The C++ standard setup.py builds with for this torch (CXX_STD there: C++20 from torch 2.14).
std=$("$py" -c "import torch; print('c++20' if torch.__version__ >= (2, 14) else 'c++17')")
if "$cxx" -std="$std" -fsyntax-only -Wall -Wextra -Werror -DRNNKERNELS_WITH_CUDA "${includes[@]}" \
    -I"$root/csrc/include" "$root/csrc/cuda_bind.cpp"; then
  echo "1 passed, 0 failed"
else
  echo "0 passed, 1 failed"
  exit 1
fi
