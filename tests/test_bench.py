"""Smoke test of the benchmark CLI (tools/bench.py attn): it runs end to end on a small context and reports
consistent numbers (timings are not asserted: speed targets live in the benchmark's output, not in tests)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attn_bench_cli_small():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "attn", "--contexts", "300",
                          "--shapes", "smollm2", "--iters", "2", "--threads", "1", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    [row] = res["rows"]
    assert row["context"] == 300 and (row["Hq"], row["H"], row["D"]) == (9, 3, 64)
    assert 0.3 < row["delta_density"] < 0.5  # keys calibrated to ~60% sparsity
    assert row["k_bytes_delta"] < row["k_bytes_dense"] and row["kernel_delta_us"] > 0
    assert row["output_rel_diff"] < 0.5


def test_vs_llamacpp_skips_cleanly_without_llama_cpp(monkeypatch):
    """Without llama-cpp-python the benchmark says how to install it and returns a skip, loading nothing."""
    import importlib.util

    from sparsedge.bench import llamacpp

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    res = llamacpp.run(type("A", (), {"model": "smollm2-135m"})())
    assert "sparsedge[bench]" in res["skipped"] and res["benchmark"] == "vs_llamacpp"


def test_long_context_bench_cli_small(stories_path, wikitext_path):
    """tools/bench.py long on stories260K: dense and delta sessions decode side by side and report K-cache bytes and
    attention sparsity (at head_dim 8 the delta buffers' per-entry overhead outweighs what they save, so no byte
    ratio is asserted). The third, --predictors session is exercised by the runs in docs/results."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "long", "--model", str(stories_path),
                          "--delta", "0.3", "--contexts", "96,200", "--new-tokens", "4", "--rounds", "2",
                          "--text", str(wikitext_path), "--threads", "1", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["context"] for r in res["rows"]] == [96, 200] and res["predictors"] is None
    for r in res["rows"]:
        assert r["delta"]["k_cache_bytes"] > 0 and r["dense"]["k_cache_bytes"] == r["dense"]["k_cache_dense_bytes"]
        assert r["delta_vs_dense"] > 0 and r["delta"]["attn_sparsity"] > 0
