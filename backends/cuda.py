"""CUDA backend: fused kernels from cuda_ops/ (built when nvcc and a CUDA torch are present)."""
from __future__ import annotations

import torch

from .base import Backend, register_backend


@register_backend
class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    kernel_module = "sparsedge.backends._cuda_kernels"
    priority = 10

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def default_dtype(self) -> torch.dtype:
        return torch.float16

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
