"""The op registry: `define` declares one `sparsedge::<op>` (schema, Meta, composite reference); the
rest answers which ops exist and which have a fused kernel on a device. Op modules import this, never
the `sparsedge.ops` package, so the package and its op modules do not import each other."""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "sparsedge"
_LIB = torch.library.Library(NAMESPACE, "DEF")
_REFERENCES: dict[str, Callable] = {}

# dispatch key name for each torch device type
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "npu": "PrivateUse1", "privateuseone": "PrivateUse1"}


def define(schema: str, reference: Callable, fake: Callable) -> None:
    """Declare `sparsedge::<schema>` with its composite reference and its Meta implementation."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    _REFERENCES[name] = reference


def reference(name: str) -> Callable:
    return _REFERENCES[name]


def op_names() -> list[str]:
    return sorted(_REFERENCES)


def has_fused(name: str, device_type: str) -> bool:
    """True when a fused (non-composite) kernel for `name` is registered for `device_type`."""
    key = DISPATCH_KEYS.get(device_type, device_type)
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key)
