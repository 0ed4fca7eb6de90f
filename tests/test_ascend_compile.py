"""Compile-check of the torch_npu binding (ascendc_ops/binding/torch_binding.cpp) against the real torch-npu headers.

torch-npu ships its C++ headers in the wheel (torch_npu/include: csrc, acl, op-plugin). The wheel pinned to this
torch version is downloaded once with `pip download --no-deps` (never installed: it would replace torch), unpacked
into ~/.cache/sparsedge/torch_npu/<version>, and the binding is checked with `g++ -fsyntax-only`. A failed download
skips locally and fails under CI=true. Nothing is linked or loaded: that needs CANN."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sparsedge_ascend_testutil", ROOT / "ascendc_ops" / "emulation" / "testutil.py")
tu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tu)

TORCH_VERSION = torch.__version__.split("+")[0]
# torch-npu X.Y.Z pins torch==X.Y.Z.*; override with SPARSEDGE_TORCH_NPU_VERSION (e.g. 2.13.0.post1)
TORCH_NPU_VERSION = os.environ.get("SPARSEDGE_TORCH_NPU_VERSION", TORCH_VERSION)


def torch_npu_headers() -> Path:
    base = Path(os.environ.get("SPARSEDGE_CACHE", Path.home() / ".cache" / "sparsedge")) / "torch_npu"
    inc = base / TORCH_NPU_VERSION / "torch_npu" / "include"
    if (inc / "torch_npu" / "csrc" / "framework" / "OpCommand.h").is_file():
        return inc
    base.mkdir(parents=True, exist_ok=True)
    wheels = sorted(base.glob(f"torch_npu-{TORCH_NPU_VERSION}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               f"{sys.version_info.major}.{sys.version_info.minor}", "--platform", "manylinux_2_28_x86_64",
               f"torch-npu=={TORCH_NPU_VERSION}", "-d", str(base)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            tu.missing("pip download of torch-npu timed out")
        wheels = sorted(base.glob(f"torch_npu-{TORCH_NPU_VERSION}-*.whl"))
        if res.returncode != 0 or not wheels:
            tu.missing(f"could not download torch-npu=={TORCH_NPU_VERSION} (matching torch {TORCH_VERSION}): "
                       f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    with zipfile.ZipFile(wheels[-1]) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        pins = [l for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist: torch")]
        if not any(TORCH_VERSION in p for p in pins):
            tu.missing(f"{wheels[-1].name} pins {pins}, not torch {TORCH_VERSION}")
        members = [n for n in z.namelist() if n.startswith("torch_npu/include/")]
        z.extractall(base / TORCH_NPU_VERSION, members)
    return inc


def test_binding_compiles_against_torch_npu_headers():
    emu = tu.emu_module()
    cxx = emu.compiler()
    if cxx is None:
        tu.missing("no g++")
    inc = torch_npu_headers()
    torch_inc, _ = emu.torch_flags()
    binding = ROOT / "ascendc_ops" / "binding" / "torch_binding.cpp"
    headers = [*(ROOT / "ascendc_ops" / "include").glob("*.h"), emu.SHARED_INCLUDE / "sparsedge" / "activations.h"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in [binding, *headers])
                         + TORCH_NPU_VERSION.encode() + torch.__version__.encode()).hexdigest()[:16]
    stamp = emu.cache_dir() / f"compile-check-{key}.ok"
    if stamp.exists():
        return
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-fPIC", f"-I{inc}", f"-I{inc / 'third_party' / 'acl' / 'inc'}",
           f"-I{ROOT / 'ascendc_ops' / 'include'}", f"-I{emu.SHARED_INCLUDE}",
           "-DSPARSEDGE_SOC_VERSION=\"ascend310b4\"", *torch_inc, str(binding)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-6000:]}"
    stamp.write_text(" ".join(cmd))


@pytest.mark.parametrize("env,needle", [({}, "ASCEND_HOME_PATH is not set"), ({"ASCEND_HOME_PATH": "/"}, "set -DSOC_VERSION")])
def test_cmake_refuses_without_cann_or_soc(tmp_path, env, needle):
    import shutil
    cmake = shutil.which("cmake")
    if cmake is None:
        tu.missing("cmake not installed")
    e = {k: v for k, v in os.environ.items() if k != "ASCEND_HOME_PATH"}
    e.update(env)
    res = subprocess.run([cmake, "-S", str(ROOT / "ascendc_ops"), "-B", str(tmp_path / "b")], capture_output=True,
                         text=True, env=e, timeout=120)
    assert res.returncode != 0 and needle in res.stderr.replace("\n", " ").replace("  ", " ")
