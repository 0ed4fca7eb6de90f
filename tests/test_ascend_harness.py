"""The host-emulation TEST HARNESS itself (ascendc_ops/emulation/kernel_operator.h): it must reject what an NPU
rejects (misaligned copies, Unified Buffer overflow, queue misuse, repeat limits, out-of-bounds GM access) and accept
valid code, with each chip's UB size. The kernels' parity under this harness is in tests/test_ops.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "sparsedge_ascend_testutil", Path(__file__).resolve().parents[1] / "ascendc_ops" / "emulation" / "testutil.py")
tu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tu)


@pytest.fixture(scope="module")
def emu():
    m = tu.emu_module()
    if m.compiler() is None:
        tu.missing("no g++ to build the emulated kernels")
    return m.Emu()


@pytest.mark.parametrize("case,needle", [
    (1, "not a multiple of 32 B"), (2, "Unified Buffer overflow"), (3, "DeQue from an empty queue"),
    (4, "all 2 buffers"), (5, "was not DeQue'd"), (6, "not freed"), (7, "256-B repeat"),
    (8, "not 32-byte aligned"), (9, "out of bounds")])
def test_harness_rejects_rule_violations(emu, case, needle):
    msg = emu.harness_case(case, "910B")
    assert msg is not None and needle in msg, msg


def test_harness_accepts_valid_code_and_chip_ub(emu):
    assert emu.harness_case(0) is None
    assert emu.harness_case(10) is None          # CompareScalar + GatherMask semantics
    assert emu.harness_case(2, "310B") is None   # 200 KB fits 310B's 248 KB UB, not 910B's 192 KB
    assert emu.harness_case(2, "910B") is not None
