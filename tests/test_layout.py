"""The package's shape, checked mechanically (tools/check_layout.py): file paths spell import names, no import
cycles, and the runtime imports nothing offline. Each check is also tested to fail on a planted violation."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_layout", ROOT / "tools" / "check_layout.py")
check_layout = importlib.util.module_from_spec(spec)
sys.modules["check_layout"] = check_layout
spec.loader.exec_module(check_layout)


def test_layout_has_no_violations():
    report = check_layout.check()
    assert report["problems"] == [], "\n".join(report["problems"])
    assert report["modules"] > 40 and report["runtime_modules"] > 20


def test_cycle_detection_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert check_layout.cycles(graph) == [["a", "b", "c"]]
    assert check_layout.cycles({"a": {"b"}, "b": set()}) == []


def test_offline_classification():
    assert check_layout.is_offline("sparsedge.calibrate.ffn") and check_layout.is_offline("sparsedge.bench")
    assert not check_layout.is_offline("sparsedge.session") and not check_layout.is_offline("sparsedge.ffn.module")


def test_imports_resolve_relative_lazy_and_from_package(tmp_path):
    mods = {"sparsedge": tmp_path / "__init__.py", "sparsedge.x": tmp_path / "x.py",
            "sparsedge.y": tmp_path / "y.py", "sparsedge.calibrate": tmp_path / "c.py"}
    f = tmp_path / "x.py"
    f.write_text("from . import y\n\ndef f():\n    from sparsedge import calibrate\n")
    assert check_layout.imports_of("sparsedge.x", f, mods) == {"sparsedge.y", "sparsedge.calibrate"}
