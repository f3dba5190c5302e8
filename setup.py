"""Builds rnnkernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc.

The CPU kernels are compiled for the SIMD level of the building machine (AVX-512, AVX2 or
generic), read from torch's own runtime detection; RNNKERNELS_CPU_CAPABILITY overrides it
(values: avx512, avx2, default), e.g. to build a wheel for older machines.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

CPU_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


# torch 2.14's headers require C++20 (ATen.h: "C++20 or later compatible compiler is required to
# use ATen"); 2.11 to 2.13 build with C++17.
CXX_STD = "-std=c++20" if torch.__version__ >= (2, 14) else "-std=c++17"


def cpu_capability() -> str:
    forced = os.environ.get("RNNKERNELS_CPU_CAPABILITY")
    if forced:
        if forced not in CPU_FLAGS:
            raise ValueError(f"RNNKERNELS_CPU_CAPABILITY must be one of {sorted(CPU_FLAGS)}, "
                             f"got {forced!r}")
        return forced
    detected = torch.backends.cpu.get_cpu_capability().lower()
    return detected if detected in CPU_FLAGS else "default"


def with_cuda() -> bool:
    if os.environ.get("RNNKERNELS_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
              + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
sources = [s for s in sources if not s.endswith("cuda_bind.cpp")]
# -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into
# this extension; without the flag every parallel_for of our kernels runs on one thread. The
# linked libgomp.so.1 resolves to the one torch has loaded (same soname), so torch's thread
# settings govern our kernels too.
cxx_flags = ["-O3", CXX_STD, "-fno-math-errno", "-fopenmp"] + CPU_FLAGS[cpu_capability()]
link_flags = ["-fopenmp"]
include_dirs = [os.path.join(ROOT, "csrc", "include")]

if with_cuda():
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) + ["csrc/cuda_bind.cpp"]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "rnnkernels._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DRNNKERNELS_WITH_CUDA"],
                            # no --use_fast_math: it turns tanhf into tanh.approx (relative error
                            # 2^-11), too coarse for fp32 results; the kernels pick the fast
                            # intrinsics themselves where the storage type allows them.
                            "nvcc": ["-O3", CXX_STD, "-lineinfo"]},
        extra_link_args=link_flags, py_limited_api=False,
    )
else:
    ext = CppExtension("rnnkernels._C", sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
