"""The `sparsedge` op schema: every kernel is declared once here, in three layers.

1. schema + Meta ("fake") implementation: shapes only, so torch can trace and check calls;
2. composite reference in plain torch ops, registered for `CompositeExplicitAutograd`: the
   definition of correct, and what every device without a fused kernel runs;
3. fused implementations registered from C++ per dispatch key: CPU (backends/cpu, OpenMP),
   CUDA (cuda_ops/), PrivateUse1 (ascendc_ops/). A fused kernel wins over the composite one for
   its device because a backend key outranks CompositeExplicitAutograd in the dispatcher.

Call ops as `torch.ops.sparsedge.<name>(...)`; call `reference(name)` to run the composite
definition directly (tests compare the two).
"""
from __future__ import annotations

from sparsedge.ops.schema import DISPATCH_KEYS, NAMESPACE, define, has_fused, op_names, reference

# Each module below calls define() for its ops at import.
from sparsedge.ops import norm  # noqa: E402,F401
from sparsedge.ops import attention  # noqa: E402,F401
from sparsedge.ops import linear  # noqa: E402,F401
from sparsedge.ops import ffn  # noqa: E402,F401
from sparsedge.ops import delta  # noqa: E402,F401
from sparsedge.ops import quant  # noqa: E402,F401
from sparsedge.ops import qffn  # noqa: E402,F401
from sparsedge.ops import bitlinear  # noqa: E402,F401

__all__ = ["DISPATCH_KEYS", "NAMESPACE", "define", "has_fused", "op_names", "reference"]
