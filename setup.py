"""Builds the monarchrt PyTorch extension (monarchrt._C) against the torch already installed:

    pip install --no-build-isolation .

The extension compiles the library's CPU sources, and, where torch has CUDA and nvcc is found,
the CUDA kernels. MONARCHRT_TORCH_CUDA=1 forces the CUDA build, =0 skips it; the default builds
it when a GPU is visible (TORCH_CUDA_ARCH_LIST picks the architectures, default: that GPU's, with
9.0a for a Hopper GPU so that its wgmma kernels are built).
MONARCHRT_NATIVE=1 compiles the CPU paths for this machine's instruction set. MAX_JOBS limits
parallel compile jobs (ninja)."""
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

CPU_SOURCES = [
    "src/core/status.cpp", "src/core/tensor.cpp", "src/core/layout.cpp", "src/core/plan.cpp",
    "src/core/backward_plan.cpp", "src/core/threads.cpp", "src/ref/dense.cpp", "src/ref/monarch.cpp",
    "src/ref/backward.cpp", "src/cpu/dense.cpp", "src/cpu/monarch.cpp", "src/cpu/backward.cpp",
]
CUDA_SOURCES = ["src/cuda/monarch/fwd.cu", "src/cuda/monarch/bwd.cu", "src/cuda/monarch/kv_cache.cu",
                "src/cuda/attention/flash.cu"]


def want_cuda():
    flag = os.environ.get("MONARCHRT_TORCH_CUDA", "auto")
    if flag == "0":
        return False
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1":
        if not possible:
            raise RuntimeError("MONARCHRT_TORCH_CUDA=1 but torch has no CUDA or nvcc was not found (CUDA_HOME)")
        return True
    return possible and torch.cuda.is_available()


def extension():
    cxx = ["-O3", "-std=c++17", "-fopenmp-simd"]
    if os.environ.get("MONARCHRT_NATIVE") == "1":
        cxx.append("-march=native")
    kwargs = dict(include_dirs=[os.path.abspath("include")], extra_compile_args={"cxx": cxx})
    sources = ["python/monarchrt/_C.cpp"] + CPU_SOURCES
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
            elif torch.cuda.get_device_capability() == (9, 0):
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"  # Hopper: the wgmma kernels
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["define_macros"] = [("MONARCHRT_WITH_CUDA", "1")]
        if "9.0a" in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";"):
            kwargs["define_macros"].append(("MONARCHRT_SM90A", "1"))
        return CUDAExtension("monarchrt._C", sources + CUDA_SOURCES, **kwargs)
    return CppExtension("monarchrt._C", sources, **kwargs)


setup(
    name="monarchrt",
    version="0.1.0",
    description="Monarch-structured attention for video diffusion transformers (PyTorch op)",
    packages=["monarchrt"],
    package_dir={"": "python"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"build": {"build_base": "build-python"}},  # build/ is CMake's
    python_requires=">=3.9",
)
