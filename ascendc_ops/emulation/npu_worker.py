"""TEST HARNESS (a subprocess of tests/test_ops.py): the NPU device of the op table. It loads the fake-NPU build of
the binding (binding/torch_binding.cpp compiled with -DSPARSEDGE_FAKE_NPU against the emulated launchers, see
emu.build_fake_binding) and runs op-table programs (sparsedge.testing.opcases) with every op call redispatched to the
binding's PrivateUse1 kernels on CPU tensors: the binding's checks, tiling, launches and host steps, and the kernel
sources executed by the emulation header. A subprocess keeps the PrivateUse1 registrations out of the test process.

Protocol, one JSON object per line prefixed with "@@" (other output is ignored): first {"registered": [the sparsedge
ops with a PrivateUse1 kernel]}; then per request {"op", "id", "soc", "cores", "inputs", "outputs"} (paths of
torch.save'd dicts) it runs the case's program on the inputs, saves its outputs and answers {"ok": true}, or
{"error": "<type>", "message": "..."} when the op raised."""
from __future__ import annotations

import ctypes
import json
import os
import sys

import torch

from sparsedge.testing import opcases

lib_path = sys.argv[1]
torch.ops.load_library(lib_path)
lib = ctypes.CDLL(lib_path)
KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1)
CASES = {(c.op, c.id): c for c in opcases.all_cases()}


def npu_op(name: str):
    op = getattr(torch.ops.sparsedge, name).default
    return lambda *args: op.redispatch(KEYS, *args)


def reply(obj: dict) -> None:
    print("@@" + json.dumps(obj), flush=True)


registered = torch._C._dispatch_get_registrations_for_dispatch_key("PrivateUse1")
reply({"registered": sorted(n.split("::", 1)[1] for n in registered if n.startswith("sparsedge::"))})
runtime = opcases.Runtime("npu", npu_op)
for line in sys.stdin:
    req = json.loads(line)
    os.environ["SPARSEDGE_FAKE_SOC"] = req["soc"]  # read by the fake aclrtGetSocName / aclGetDeviceCapability
    os.environ["SPARSEDGE_FAKE_CORES"] = str(req["cores"])
    lib.sd_emu_chip_from_env()  # the emulated Unified Buffer of that chip
    try:
        out = opcases.build(CASES[req["op"], req["id"]]).run(runtime, torch.load(req["inputs"]))
        torch.save(opcases.to_cpu(out), req["outputs"])
        reply({"ok": True})
    except (RuntimeError, ValueError) as exc:
        reply({"error": type(exc).__name__, "message": str(exc)})
