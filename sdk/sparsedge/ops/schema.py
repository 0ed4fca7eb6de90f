"""The op registry: `define` declares one `sparsedge::<op>` (schema, Meta, composite reference); the
rest answers which ops exist and which have a fused kernel on a device. Op modules import this, never
the `sparsedge.ops` package, so the package and its op modules do not import each other.

Each op module also lists its parity cases, `CASES` (a `Case` per input configuration, usually built with
`sweep`): tests/test_ops.py runs every case on every device that has a kernel for the op and compares the
result with the composite reference; sparsedge.testing.opcases turns a case's params into tensors."""
from __future__ import annotations

import itertools
from typing import Callable, NamedTuple

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


# ------------------------------------------------------------------------------------------ parity cases
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Case(NamedTuple):
    """One parity case of `op`: its input configuration (`params`: shapes, densities, GQA ratio, edge cases; the
    keys are those sparsedge.testing.opcases reads for the op) and the dtype of its float tensors."""
    op: str
    params: dict
    dtype: torch.dtype = torch.float32
    slow: bool = False  # large: runs only with `pytest -m slow`
    raises: str | None = None  # an error case: every fused kernel must raise this (a regex); no reference run
    devices: tuple[str, ...] | None = None  # only these device kinds ("cpu", "cuda", "npu"); None: every one

    @property
    def id(self) -> str:
        def fmt(v):
            if isinstance(v, (tuple, list)):
                return "x".join(map(fmt, v)) if isinstance(v, tuple) else "+".join(map(fmt, v))
            return f"{v:g}" if isinstance(v, float) else str(v)
        params = (f"{k}{fmt(v)}" for k, v in self.params.items())
        return "-".join([_DTYPE_IDS.get(self.dtype, str(self.dtype)), *params])


def rows(names: str, *values: tuple) -> list[dict]:
    """rows("H G D", (3, 1, 64), (2, 4, 128)) -> [{"H": 3, "G": 1, "D": 64}, ...]: one sweep axis of tied values."""
    keys = names.split()
    return [dict(zip(keys, v, strict=True)) for v in values]


def sweep(op: str, dtypes=(torch.float32,), slow: Callable[[dict], bool] | None = None,
          devices: tuple[str, ...] | None = None, **axes) -> list[Case]:
    """The cross product of `axes` (name -> list of values; a dict value contributes several params, see `rows`) and
    `dtypes`, as Cases of `op`; `slow(params)` (params include "dtype") marks the large ones."""
    out = []
    for dtype in dtypes:
        for combo in itertools.product(*axes.values()):
            params = {}
            for name, v in zip(axes, combo):
                params.update(v if isinstance(v, dict) else {name: v})
            out.append(Case(op, params, dtype, slow=bool(slow and slow({**params, "dtype": dtype})), devices=devices))
    return out
