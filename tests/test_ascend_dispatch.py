"""Dispatch through the real binding code (ascendc_ops/binding/torch_binding.cpp) with a fake torch_npu:
the binding is compiled by g++ with -DSPARSEDGE_FAKE_NPU against fake OpCommand / NPUStream / acl headers
(ascendc_ops/emulation/fake_torch_npu, a TEST HARNESS) and the emulated launchers, loaded into a subprocess, and
each op's PrivateUse1 kernel is called on CPU tensors. We check that the ops run inside OpCommand custom handlers,
pass arguments to the kernels in kernel order, produce the reference's results, and reject an unknown activation
name the way every device does (backends/include/sparsedge/activations.h)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedge.activations import ACTIVATIONS

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sparsedge_ascend_testutil", ROOT / "ascendc_ops" / "emulation" / "testutil.py")
tu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tu)


def parse(line: str):
    name, rest = line.split(" ", 1)
    toks = rest.split()
    block = int(toks[0].split("=")[1])
    args = []
    for t in toks[1:]:
        kind, val = t.split(":", 1)
        args.append(val if kind == "ptr" else float(val) if kind == "f" else int(val))
    return name, block, args


@pytest.fixture(scope="module")
def report():
    emu = tu.emu_module()
    if emu.compiler() is None:
        tu.missing("no g++ to build the fake-NPU binding")
    lib = emu.build_fake_binding()
    env = dict(os.environ, SPARSEDGE_FAKE_SOC="Ascend310B4", SPARSEDGE_FAKE_CORES="4")
    res = subprocess.run([sys.executable, str(ROOT / "ascendc_ops" / "emulation" / "dispatch_probe.py"), str(lib)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["stderr"] = res.stderr  # c10 warnings raised under a redispatch (no Python warning handler) land here
    return out


def test_build_info_and_activation_names(report):
    # which ops the library registers for PrivateUse1 is checked with the other devices' in tests/test_ops.py
    assert report["build_info"].split(";")[-1] == "fake=1"
    supported = ", ".join(ACTIVATIONS)
    assert report["cases"]["bad_activation"] == f"ValueError: unknown FFN activation 'swish' (supported: {supported})"


def test_sparse_ffn_argument_order(report):
    case = report["cases"]["sparse_ffn"]
    p = case["ptrs"]
    assert case["cmds"] == ["sparsedge_sparse_ffn"]
    assert case["err"] < 2e-3 and case["count_ok"]
    (k1, b1, a1), (k2, b2, a2) = map(parse, case["log"])
    assert k1 == "sparsedge_ffn_f16" and k2 == "sparsedge_ffn_reduce_f16"
    # x, p1, p2, bias, w_gate, w_up, w_down_t, idx, count, workspace, then T, d, r, I, mode, act, act_param, tau
    assert a1[:7] == [p["x"], p["p1"], p["p2"], p["bias"], p["w_gate"], p["w_up"], p["w_down_t"]]
    assert a1[7] == "0" and a1[8] == "0"
    assert a1[10:18] == [2, 72, 20, 300, 0, 1, 0.0, 0.0]      # gelu = 1, fused mode = 0
    assert b1 == 3                                            # 300 neurons -> 128 per core on 4 cores
    # reduce: workspace, y, count, down_count, T, d, dPad, mainBlocks, cols
    assert a2[0] == a1[9]
    assert a2[1:4] == [p["y"], p["count"], p["down_count"]]
    assert a2[4:8] == [2, 72, 80, b1]


def test_predict_and_rows_argument_order(report):
    pr = report["cases"]["ffn_predict"]
    assert pr["ok"] and pr["cmds"] == ["sparsedge_ffn_predict"]
    (k1, _, a1), (k2, _, a2) = map(parse, pr["log"])
    assert k1 == "sparsedge_ffn_f16" and a1[14] == 2 and k2 == "sparsedge_ffn_concat"
    assert a2[0] == a1[9] and a2[1:3] == [pr["ptrs"]["idx"], pr["ptrs"]["count"]]
    rows = report["cases"]["sparse_ffn_rows"]
    assert rows["err"] < 2e-3 and rows["count_ok"]
    (k1, b1, a1), _ = map(parse, rows["log"])
    assert a1[1:4] == ["0", "0", "0"] and a1[7:9] == [rows["ptrs"]["idx"], rows["ptrs"]["count"]]
    assert a1[14:18] == [1, 4, 0.05, 0.0] and b1 == 4         # rows mode, fatrelu(0.05), all 4 cores


def test_ffn_predict_q4_argument_order(report):
    case = report["cases"]["ffn_predict_q4"]
    assert case["ok"] and case["cmds"] == ["sparsedge_ffn_predict_q4"]
    (k1, b1, a1), (k2, b2, a2) = map(parse, case["log"])
    p = case["ptrs"]
    assert k1 == "sparsedge_ffn_q4_f16" and k2 == "sparsedge_ffn_concat"
    # x, q, scale, thresh, workspace, then T, d, G, I, act, act_param, hPad, ngPad, nPerCore, nTile, qRows
    assert a1[:4] == [p["x"], p["q"], p["scale"], p["thresh"]]
    assert a1[5:11] == [2, 64, 32, 300, 1, 0.0]                # gelu = 1
    assert a1[11:15] == [32, 8, 128, 128]                     # 32 B half-rows, 2 groups -> 8, 300 on 4 cores
    assert b1 == 3
    # concat: workspace, idx, count, T, I, dPad = 0 (no partial-y region), mainBlocks, nPerCore
    assert a2[0] == a1[4] and a2[1:3] == [p["idx"], p["count"]]
    assert a2[3:8] == [2, 300, 0, b1, 128] and b2 == 2


def test_qsparse_ffn_rows_q8_argument_order(report):
    case = report["cases"]["qsparse_ffn_rows_q8_0"]
    assert case["cmds"] == ["sparsedge_qsparse_ffn_rows_q8"] and not case["warnings"]
    assert case["count_ok"] and case["dtype_ok"] and case["err"] < 2e-3 * max(1.0, case["scale"])
    (k1, b1, a1), (k2, b2, a2) = map(parse, case["log"])
    p = case["ptrs"]
    assert k1 == "sparsedge_qffn_rows_q8" and k2 == "sparsedge_qffn_reduce"
    # x (an fp32 copy: fp16 here), idx, count, w_gate_up, down codes, down scale, workspace, then T, d, I, act,
    # act_param, bPerCore, nbxPad, nTile, nList
    assert a1[0] != p["x"] and a1[1:6] == [p["idx"], p["count"], p["w"], p["codes"], p["scale"]]
    assert a1[7:12] == [2, 64, 160, ACTIVATIONS.index("relu2"), 0.0]
    assert a1[12:16] == [2, 8, 64, 256] and b1 == 3          # 5 blocks of 32 neurons: 2 per core on 4 cores -> 3
    # reduce: workspace, y (fp32), down_count, T, d, mainBlocks, cols
    assert a2[0] == a1[6] and a2[2] == p["down_count"]
    assert a2[3:7] == [2, 64, b1, 16] and b2 == 4


def test_qsparse_ffn_rows_other_formats_fall_back_loudly(report):
    case = report["cases"]["qsparse_ffn_rows_q4_1"]
    assert case["log"] == [] and case["cmds"] == []           # no kernel launched: the composite reference ran
    assert case["count_ok"] and case["dtype_ok"] and case["err"] == 0.0
    # TORCH_WARN_ONCE: a Python UserWarning under a plain op call; the probe redispatches, so c10 prints it to stderr
    warned = [w for w in case["warnings"] + report["stderr"].splitlines() if "sparsedge::qsparse_ffn_rows" in w]
    assert len(warned) == 1 and "q8_0" in warned[0] and "q4_1" in warned[0] and "composite reference" in warned[0]


def test_delta_encode_dispatch(report):
    case = report["cases"]["delta_encode"]
    assert case["ok"] and case["cmds"] == ["sparsedge_delta_encode"]
    (k, b, a), = map(parse, case["log"])
    p = case["ptrs"]
    assert k == "sparsedge_delta_encode_f16" and b == 2
    assert [a[1], a[3], a[4], a[5]] == [p["ref"], p["values"], p["chan"], p["offsets"]]
    assert a[7:13] == [30, 2, 64, 2560, 41, 0]                 # T, H, D, cap, Tmax + 1, start
    assert report["cases"]["overflow"].startswith("delta buffer capacity exceeded")


def test_delta_attention_dispatch(report):
    one = report["cases"]["delta_attention_T1"]
    assert one["err"] < 2e-3 and one["cmds"] == ["sparsedge_delta_attention"]
    (k, b, a), = map(parse, one["log"])
    p = one["ptrs"]
    assert k == "sparsedge_delta_attention_decode_f16"
    assert a[0] == p["q"] and a[2] == p["v_cache"] and a[8] == p["out"]
    assert a[10:21] == [2, 2, 64, 40, 2560, 2, 8, 29, 2, 8, a[20]]   # H, G, D, Tmax, cap, S, W, start, n_sink, window
    assert abs(a[20] - 0.125) < 1e-6
    many = report["cases"]["delta_attention_T5"]
    assert many["err"] < 2e-3 and len(many["cmds"]) == 5     # a chunk runs token by token
    assert [parse(line)[2][17] for line in many["log"]] == [20, 21, 22, 23, 24]
