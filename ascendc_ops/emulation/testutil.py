"""Shared helpers for tests/test_ascend_*.py and the NPU device of tests/test_ops.py (TEST HARNESS side)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def emu_module():
    spec = importlib.util.spec_from_file_location("sparsedge_ascend_emu", HERE / "emu.py")
    mod = sys.modules.get("sparsedge_ascend_emu")
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sparsedge_ascend_emu"] = mod
        spec.loader.exec_module(mod)
    return mod
