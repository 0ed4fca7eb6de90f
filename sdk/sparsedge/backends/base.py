"""The Backend interface and its registry."""
from __future__ import annotations

import importlib
import warnings

import torch
from loguru import logger

from sparsedge import ops


class BackendUnavailableError(RuntimeError):
    pass


class Backend:
    """One device and its kernels. Subclasses set `name`, `device_type`, `kernel_module`."""

    name = "base"
    device_type = "cpu"
    kernel_module: str | None = None  # importing it registers the fused kernels for device_type
    priority = 0  # higher wins in "auto"

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device or self.device_type)
        self.kernel_error: str | None = None
        self._load_kernels()
        self._warned: set[str] = set()

    # --- capability -----------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        return True

    def _load_kernels(self) -> None:
        if not self.kernel_module:
            return
        try:
            importlib.import_module(self.kernel_module)
        except Exception as exc:  # noqa: BLE001 - reported by doctor and by the fallback warning
            self.kernel_error = f"{type(exc).__name__}: {exc}"

    def fused_ops(self) -> dict[str, bool]:
        """Each op of the schema -> whether a fused kernel is registered for this device."""
        return {name: ops.has_fused(name, self.device_type) for name in ops.op_names()}

    def require(self, *names: str) -> None:
        """Warn once, loudly, for each op here that will run the composite (slow) path."""
        for name in names:
            if name in self._warned or ops.has_fused(name, self.device_type):
                continue
            self._warned.add(name)
            why = f" (kernel library failed to load: {self.kernel_error})" if self.kernel_error else ""
            msg = (f"[{self.name}] no fused kernel for sparsedge::{name}{why}; using the composite reference "
                   f"path, which is much slower. Run `sparsedge doctor` to see what was built.")
            # warnings.warn, not only the logger: library logging is off by default, and a silent
            # fallback is the failure Ascend users complain about most.
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning(msg)

    # --- placement --------------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def place(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Move a weight onto this backend's device (once, at load) in the kernels' layout."""
        return t.to(device=self.device, dtype=dtype or t.dtype).contiguous()

    def synchronize(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "available": self.is_available(),
                "kernel_library": self.kernel_module, "kernel_error": self.kernel_error,
                "fused_ops": self.fused_ops()}


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    return cls


def available_backends() -> dict[str, bool]:
    return {name: cls.is_available() for name, cls in _REGISTRY.items()}


def get_backend(name: str | Backend = "auto") -> Backend:
    if isinstance(name, Backend):
        return name
    if name == "auto":
        for cls in sorted(_REGISTRY.values(), key=lambda c: -c.priority):
            if cls.is_available():
                return cls()
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"unknown backend {name!r} (known: auto, {', '.join(sorted(_REGISTRY))})")
    cls = _REGISTRY[name]
    if not cls.is_available():
        raise BackendUnavailableError(f"backend {name!r} is not available on this machine; "
                                      f"available: {[n for n, ok in available_backends().items() if ok]}")
    return cls()
