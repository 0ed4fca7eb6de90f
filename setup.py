"""Builds the fused kernels at install time.

- sparsedge.backends._cpu_kernels: backends/cpu/*.cpp (C++ with OpenMP via ATen's parallel_for
  and SIMD), always built; it only registers CPU implementations of the `sparsedge` ops.
- sparsedge.backends._cuda_kernels: cuda_ops/*.cu + cuda_ops/binding.cpp, built only when nvcc and a
  CUDA build of torch are both present (never required on CPU machines).
Set SPARSEDGE_CPU_ARCH="-march=x86-64-v3" (say) to build portable binaries; the default tunes for
the build machine, which is where an on-device SDK is installed.
"""
import glob
import os
import shutil

from setuptools import setup

def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only builds
        return [], {}
    arch = os.environ.get("SPARSEDGE_CPU_ARCH", "-march=native").split()
    exts = [cpp_extension.CppExtension(
        "sparsedge.backends._cpu_kernels",
        sorted(glob.glob("backends/cpu/*.cpp")),
        include_dirs=[os.path.abspath("backends/include")],
        extra_compile_args=["-O3", "-fopenmp", *arch],
        extra_link_args=["-fopenmp"],
    )]
    cuda_sources = sorted(glob.glob("cuda_ops/*.cu"))
    if cuda_sources and torch.version.cuda and shutil.which("nvcc") and os.environ.get("SPARSEDGE_NO_CUDA") != "1":
        exts.append(cpp_extension.CUDAExtension(
            "sparsedge.backends._cuda_kernels",
            cuda_sources + sorted(glob.glob("cuda_ops/*.cpp")),
            include_dirs=[os.path.abspath("backends/include")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        ))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
