"""CPU backend: the reference device, with fused C++ kernels (backends/cpu, OpenMP) built at install."""
from __future__ import annotations

import torch

from sparsedge.backends.base import Backend, register_backend


@register_backend
class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    kernel_module = "sparsedge.backends._cpu_kernels"
    priority = 0

    def default_dtype(self) -> torch.dtype:
        return torch.float32
