"""CUDA backend: fused kernels from cuda_ops/ (built when nvcc and a CUDA torch are present).

Importing `sparsedge.backends._cuda_kernels` registers the kernels for the CUDA dispatch key of every
`sparsedge` op (cuda_ops/binding.cpp). Weights live on the GPU in fp16 by default (bf16/fp32 work too),
contiguous, W_down stored transposed by the Session; kernels accumulate in fp32. When the extension was
not built (CPU torch at install time, SPARSEDGE_NO_CUDA=1), every op falls back to the composite
reference with one warning per op (Backend.require) and `sparsedge doctor` shows the import error.
"""
from __future__ import annotations

import torch

from sparsedge.backends.base import Backend, register_backend


@register_backend
class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    kernel_module = "sparsedge.backends._cuda_kernels"
    priority = 10

    @classmethod
    def is_available(cls) -> bool:
        try:
            return torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - broken driver installs raise instead of returning False
            return False

    def default_dtype(self) -> torch.dtype:
        return torch.float16

    def place(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Once, at load: copy to this GPU in the kernels' dtype, contiguous (16-byte aligned rows for the
        vectorised loads come from the caching allocator; odd row sizes use the scalar path)."""
        return t.to(device=self.device, dtype=dtype or t.dtype, non_blocking=False).contiguous()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        info = super().describe()
        if self.is_available():
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1), torch_cuda=torch.version.cuda)
        return info
