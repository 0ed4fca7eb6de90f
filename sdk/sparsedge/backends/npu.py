"""Ascend NPU backend (torch_npu, PrivateUse1): AscendC kernels from ascendc_ops/ when built.

The fused kernels live in a separately built library (ascendc_ops/CMakeLists.txt, needs CANN + torch_npu):
`libsparsedge_ascend.so`, which registers PrivateUse1 implementations of the sparsedge op schema. It is loaded
with torch.ops.load_library from $SPARSEDGE_ASCEND_LIB, else from the installed package
(`cmake --install ascendc_ops/build` puts it beside this module). Without it, every op runs its composite reference (plain torch ops: index_select,
matmul, cumsum, softmax ...) which torch_npu executes with its own aclnn kernels; `require()` warns once,
loudly, per missing kernel, and `describe()` (printed by `sparsedge doctor`) says which kernels are present.
"""
from __future__ import annotations

import ctypes
import importlib.resources
import importlib.util
import os
from pathlib import Path

import torch

from sparsedge import ops

from sparsedge.backends.base import Backend, register_backend

ENV_LIB = "SPARSEDGE_ASCEND_LIB"
LIB_NAME = "libsparsedge_ascend.so"
# ops with an AscendC kernel in ascendc_ops/kernels (the others always run their composite reference on NPU);
# delta_step is delta_encode + delta_attention and slice copies, composed in the binding.
# qsparse_ffn_rows: the kernel covers q8_0 gate/up with a q8_0 W_down; the binding runs the composite reference, with a
# warning, for the other formats (its op-table cases on other formats are marked devices=("cpu", "cuda")).
NPU_KERNEL_OPS = ("ffn_predict", "sparse_ffn", "sparse_ffn_rows", "delta_encode", "delta_attention", "delta_step",
                  "ffn_predict_q4", "qsparse_ffn_rows")

_state: dict = {"tried": False, "path": None, "error": None, "build_info": None}


def _torch_npu_import_error() -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed"
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - e.g. no CANN runtime (libhccl.so) on this machine
        return f"import torch_npu failed: {type(exc).__name__}: {exc}"
    return None


def _torch_npu_ready() -> bool:
    if _torch_npu_import_error() is not None:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def library_candidates() -> list[Path]:
    """Where the built kernel library is looked for, in order."""
    out = []
    env = os.environ.get(ENV_LIB)
    if env:
        out.append(Path(env))
    # package data: `cmake --install ascendc_ops/build` copies the library into the installed package
    out.append(Path(str(importlib.resources.files("sparsedge.backends") / LIB_NAME)))
    return out


def load_kernel_library(force: bool = False) -> str | None:
    """Load libsparsedge_ascend.so once; returns its path, or None with the reason in `_state['error']`."""
    if _state["tried"] and not force:
        return _state["path"]
    _state.update(tried=True, path=None, error=None, build_info=None)
    err = _torch_npu_import_error()
    if err is not None:
        _state["error"] = f"{err}; the AscendC kernel library needs torch_npu (and CANN) to load"
        return None
    env = os.environ.get(ENV_LIB)
    if env and not Path(env).is_file():
        _state["error"] = f"${ENV_LIB}={env} does not exist"
        return None
    for path in library_candidates():
        if not path.is_file():
            continue
        try:
            torch.ops.load_library(str(path))
        except Exception as exc:  # noqa: BLE001 - reported by doctor and by the fallback warning
            _state["error"] = f"loading {path} failed: {type(exc).__name__}: {exc}"
            return None
        _state["path"] = str(path)
        try:
            fn = ctypes.CDLL(str(path)).sparsedge_ascend_build_info
            fn.restype = ctypes.c_char_p
            _state["build_info"] = fn().decode()
        except (OSError, AttributeError):
            pass
        return str(path)
    _state["error"] = (f"{LIB_NAME} not found (looked in {', '.join(map(str, library_candidates()))}); build "
                       f"ascendc_ops/ with CANN (see ascendc_ops/README.md) or set ${ENV_LIB}")
    return None


@register_backend
class NPUBackend(Backend):
    name = "npu"
    device_type = "npu"
    kernel_module = None  # the kernels come from a CMake-built library, see load_kernel_library()
    priority = 20

    @classmethod
    def is_available(cls) -> bool:
        return _torch_npu_ready()

    def _load_kernels(self) -> None:
        self.kernel_path = load_kernel_library()
        self.kernel_error = None if self.kernel_path else _state["error"]

    def default_dtype(self) -> torch.dtype:
        return torch.float16

    def synchronize(self) -> None:
        if _torch_npu_ready():
            torch.npu.synchronize()

    def npu_kernels(self) -> dict[str, bool]:
        """Each op that has an AscendC kernel -> whether it is registered for PrivateUse1 right now."""
        return {name: ops.has_fused(name, self.device_type) for name in NPU_KERNEL_OPS}

    def describe(self) -> dict:
        info = super().describe()
        soc = None
        if _torch_npu_ready():
            try:
                soc = torch.npu.get_device_name()
            except Exception:  # noqa: BLE001
                soc = None
        kernels = self.npu_kernels()
        info.update({
            "kernel_library": self.kernel_path,
            "kernel_library_candidates": [str(p) for p in library_candidates()],
            "kernel_build_info": _state["build_info"],
            "torch_npu": _torch_npu_import_error() or "ok",
            "soc": soc,
            "npu_kernels": kernels,
            "npu_kernels_missing": [k for k, ok in kernels.items() if not ok],
        })
        return info

    @classmethod
    def describe_offline(cls) -> dict:
        """For `sparsedge doctor` on a machine where the backend is unavailable: why, and what is on disk."""
        found = next((str(p) for p in library_candidates() if p.is_file()), None)
        reason = _torch_npu_import_error() or "torch_npu imports but no NPU device is visible"
        return {
            "reason": reason,
            "kernel_library": found,
            "kernel_library_candidates": [str(p) for p in library_candidates()],
            "kernel_error": load_kernel_library() and None or _state["error"],
            "npu_kernels": {name: False for name in NPU_KERNEL_OPS},
        }
