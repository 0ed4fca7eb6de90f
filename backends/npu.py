"""Ascend NPU backend (torch_npu, PrivateUse1): AscendC kernels from ascendc_ops/ when built."""
from __future__ import annotations

import importlib.util

import torch

from .base import Backend, register_backend


def _torch_npu_ready() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:  # noqa: BLE001 - no CANN runtime on this machine
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


@register_backend
class NPUBackend(Backend):
    name = "npu"
    device_type = "npu"
    kernel_module = None  # set by ascendc_ops integration
    priority = 20

    @classmethod
    def is_available(cls) -> bool:
        return _torch_npu_ready()

    def default_dtype(self) -> torch.dtype:
        return torch.float16
