"""Backends: where the model's weights live and which fused kernels run its ops.

A `Backend` is small (ggml-backend style): a device, the weight dtype/layout it wants, and which
fused `sparsedge` kernels it has. Anything it lacks runs the composite reference of the op schema
(sparsedge.ops), with one loud warning per missing kernel. Backends register themselves here;
`get_backend("auto")` picks NPU, then CUDA, then CPU.
"""
from __future__ import annotations

from sparsedge.backends.base import Backend, BackendUnavailableError, available_backends, get_backend, register_backend

# import for registration side effects (each module registers its class)
from sparsedge.backends import cpu  # noqa: F401,E402
from sparsedge.backends import cuda  # noqa: F401,E402
from sparsedge.backends import npu  # noqa: F401,E402

__all__ = ["Backend", "BackendUnavailableError", "available_backends", "get_backend", "register_backend"]
