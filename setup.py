"""Builds the fused kernels at install time.

- sparsedge.backends._cpu_kernels: backends/cpu/*.cpp (C++ with OpenMP via ATen's parallel_for
  and SIMD), always built; it only registers CPU implementations of the `sparsedge` ops.
- sparsedge.backends._cuda_kernels: cuda_ops/*.cu + cuda_ops/binding.cpp, built only when nvcc and a
  CUDA build of torch are both present (never required on CPU machines).
Set SPARSEDGE_CPU_ARCH="-march=x86-64-v3" (say) to build portable binaries; the default tunes for
the build machine, which is where an on-device SDK is installed.

Repeated installs are incremental: objects live in ./build/temp.<platform>-<python>/<extension> (not in the
throw-away folder pip gives an editable build), and ninja recompiles only the sources whose text, headers or
flags changed. Compiles run in parallel (MAX_JOBS, default: the usable cores); each source is logged as it is
compiled or reused (`pip install -v` shows the log). SPARSEDGE_BUILD_TEMP overrides the object folder.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _say(msg: str) -> None:
    print(f"sparsedge build: {msg}", flush=True)


def incremental_build_ext(cpp_extension):
    """torch's BuildExtension (ninja) with a persistent object folder per extension, parallel jobs and one
    log line per source."""
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class build_ext(base):
        def finalize_options(self):
            super().finalize_options()
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.environ.get("SPARSEDGE_BUILD_TEMP") or os.path.join(HERE, "build", f"temp.{tag}")

        def build_extensions(self):
            os.environ.setdefault("MAX_JOBS", str(_usable_cores()))
            run_ninja = getattr(cpp_extension, "_run_ninja_build", None)
            if run_ninja is not None:
                def logged_run(build_directory, verbose, error_prefix):
                    _log_ninja_plan(build_directory)
                    return run_ninja(build_directory, verbose, error_prefix)
                cpp_extension._run_ninja_build = logged_run
            try:
                super().build_extensions()
            finally:
                if run_ninja is not None:
                    cpp_extension._run_ninja_build = run_ninja

        def build_extension(self, ext):
            # one object folder per extension: each writes its own build.ninja, and ninja's log only remembers
            # the outputs of the build file it last ran
            shared = self.build_temp
            self.build_temp = os.path.join(shared, ext.name.rsplit(".", 1)[-1])
            _say(f"{ext.name}: {len(ext.sources)} sources, objects in {os.path.relpath(self.build_temp, HERE)}, "
                 f"{os.environ.get('MAX_JOBS')} parallel jobs")
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared

    return build_ext


def _log_ninja_plan(build_directory: str) -> None:
    """One line per source: compiled now (ninja's dry run lists it) or reused."""
    try:
        with open(os.path.join(build_directory, "build.ninja")) as f:
            targets = re.findall(r"^build (\S+): \w+ (\S+)", f.read(), flags=re.M)  # (object, source)
        dry = subprocess.run(["ninja", "-n", "-v"], cwd=build_directory, capture_output=True, text=True, check=True)
        todo = set(re.findall(r" -o (\S+)", dry.stdout))  # objects ninja would (re)build
    except (OSError, subprocess.CalledProcessError):
        return  # the real build reports any problem
    for obj, src in targets:
        rel = os.path.relpath(src.replace("$:", ":"), HERE)
        _say(f"{'compiling' if obj in todo else 'up to date'} {rel}")
    _say(f"{sum(obj in todo for obj, _ in targets)} of {len(targets)} sources to compile")


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
    return exts, {"build_ext": incremental_build_ext(cpp_extension)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
