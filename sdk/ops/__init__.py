"""The `sparsedge` op schema: every kernel is declared once here, in three layers.

1. schema + Meta ("fake") implementation: shapes only, so torch can trace and check calls;
2. composite reference in plain torch ops, registered for `CompositeExplicitAutograd`: the
   definition of correct, and what every device without a fused kernel runs;
3. fused implementations registered from C++ per dispatch key: CPU (backends/csrc, OpenMP),
   CUDA (cuda_ops/), PrivateUse1 (ascendc_ops/). A fused kernel wins over the composite one for
   its device because a backend key outranks CompositeExplicitAutograd in the dispatcher.

Call ops as `torch.ops.sparsedge.<name>(...)`; call `reference(name)` to run the composite
definition directly (tests compare the two).
"""
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


# Each module below calls define() for its ops at import.
from . import norm  # noqa: E402,F401
from . import attention  # noqa: E402,F401
from . import linear  # noqa: E402,F401
from . import ffn  # noqa: E402,F401
from . import delta  # noqa: E402,F401
