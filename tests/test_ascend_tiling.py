"""Host tiling of the AscendC kernels (ascendc_ops/include/sparsedge_tiling.h), checked for 310B and 910B through
ctypes on the same C++ functions the torch_npu binding calls; and the emulated kernels reserve exactly the Unified
Buffer their tiling budgeted (their numerics are checked in tests/test_ops.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "sparsedge_ascend_testutil", Path(__file__).resolve().parents[1] / "ascendc_ops" / "emulation" / "testutil.py")
tu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tu)

CHIPS = {"310B": 253952, "910B": 196608}
# (T, d, r, I): SmolLM2-135M, a 1B-class model, Llama-2-7B (ProSparse), Mistral-7B (TurboSparse), d = 8192
FFN_SHAPES = [(1, 576, 32, 1536), (1, 2048, 128, 8192), (1, 4096, 256, 11008), (4, 4096, 352, 14336),
              (1, 8192, 512, 28672), (1, 100, 7, 37)]


@pytest.fixture(scope="module")
def emu():
    m = tu.emu_module()
    if m.compiler() is None:
        tu.missing("no g++ to build the tiling library")
    return m.Emu()


def test_chip_ub_sizes(emu):
    assert emu.ub_bytes("310B") == 253952
    assert emu.ub_bytes("910B") == 196608


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("mode", ["fused", "rows", "predict"])
@pytest.mark.parametrize("shape", FFN_SHAPES)
@pytest.mark.parametrize("cores", [1, 8, 48])
def test_ffn_tiling(emu, chip, mode, shape, cores):
    T, d, r, I = shape
    rc, t = emu.ffn_tiling(chip, mode, T, d, r, I, cores)
    assert rc == 0, t
    assert t["ubLimit"] == CHIPS[chip]
    assert t["ubBytes"] <= t["ubLimit"] and t["redUbBytes"] <= t["ubLimit"]
    assert t["dPad"] % 16 == 0 and t["dPad"] >= d and t["dPad"] - d < 16          # 32 B of fp16 rows
    assert t["nTile"] % 64 == 0 and t["nTile"] >= 64                            # whole 256-B fp32 repeats
    assert t["nTile"] * 4 // 256 <= 255                                         # CompareScalar / GatherMask repeats
    assert t["blockDim"] <= cores
    if mode != "rows":
        assert t["nPerCore"] % 64 == 0
        assert t["blockDim"] * t["nPerCore"] >= I > (t["blockDim"] - 1) * t["nPerCore"]
        assert t["rPad"] % 16 == 0 and t["rPad"] >= r
        assert t["p2Rows"] >= 1
    assert t["redCols"] % 16 == 0
    if mode != "predict":
        assert t["redBlockDim"] * t["redCols"] >= t["dPad"]
    ws = T * t["blockDim"] * t["dPad"] * 4 + T * t["blockDim"] * 32
    if mode == "predict":
        ws += T * t["blockDim"] * t["nPerCore"] * 4
    assert t["wsBytes"] == ws


def test_ffn_tiling_uses_the_bigger_310b_ub(emu):
    # with the largest model here, 910B's 192 KB forces a smaller tile than 310B's 248 KB (or the same)
    _, a = emu.ffn_tiling("310B", "fused", 1, 8192, 512, 28672, 1)
    _, b = emu.ffn_tiling("910B", "fused", 1, 8192, 512, 28672, 1)
    assert a["ubBytes"] > 196608 >= b["ubBytes"]
    assert b["nTile"] < a["nTile"]


def test_ffn_tiling_rejects(emu):
    assert emu.ffn_tiling("910B", "fused", 1, 65536, 64, 1024, 8)[0] == 2   # SD_ERR_UB: row does not fit
    assert emu.ffn_tiling("310B", "fused", 0, 64, 16, 128, 8)[0] == 1       # SD_ERR_ARG
    assert emu.ffn_tiling("310B", "fused", 1, 64, 0, 128, 8)[0] == 1        # fused needs a predictor
    assert emu.ffn_tiling("310B", "fused", 1, 64, 16, 128, 8, elem_bytes=4)[0] == 1


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("T,d,I", [(1, 576, 1536), (1, 2048, 8192), (1, 4096, 11008), (4, 4096, 14336),
                                   (1, 8192, 28672), (3, 96, 37)])
@pytest.mark.parametrize("G", [16, 32, 64, 128])
@pytest.mark.parametrize("cores", [1, 8, 48])
def test_ffn_q4_tiling(emu, chip, T, d, I, G, cores):
    if d % G:
        assert emu.ffn_q4_tiling(chip, T, d, G, I, cores)[0] == 1
        return
    rc, t = emu.ffn_q4_tiling(chip, T, d, G, I, cores)
    assert rc == 0, t
    assert t["ubLimit"] == CHIPS[chip] and t["ubBytes"] <= t["ubLimit"] and t["concatUbBytes"] <= t["ubLimit"]
    assert t["dPad"] % 16 == 0 and 0 <= t["dPad"] - d < 16
    assert t["hPad"] % 32 == 0 and 0 <= t["hPad"] - d // 2 < 32                # one 32-B aligned UB block per half-row
    assert t["ngPad"] % 8 == 0 and 0 <= t["ngPad"] - d // G < 8
    assert t["nPerCore"] % 64 == 0 and t["blockDim"] * t["nPerCore"] >= I > (t["blockDim"] - 1) * t["nPerCore"]
    assert t["nTile"] % 64 == 0 and 64 <= t["nTile"] <= min(t["nPerCore"], 2048) and t["qRows"] >= 1
    assert t["blockDim"] <= cores and t["concatBlockDim"] == min(T, cores)
    assert t["wsBytes"] == T * t["blockDim"] * 32 + T * t["blockDim"] * t["nPerCore"] * 4


def test_ffn_q4_tiling_rejects(emu):
    assert emu.ffn_q4_tiling("310B", 1, 256, 24, 64, 8)[0] == 1    # G not a multiple of 16
    assert emu.ffn_q4_tiling("310B", 1, 512, 256, 64, 8)[0] == 1   # G > 128: more than one repeat per group
    assert emu.ffn_q4_tiling("310B", 1, 200, 32, 64, 8)[0] == 1    # d not a multiple of G
    assert emu.ffn_q4_tiling("310B", 0, 256, 32, 64, 8)[0] == 1
    assert emu.ffn_q4_tiling("910B", 1, 256, 32, 64, 8, elem_bytes=4)[0] == 1


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("T,d,I", [(1, 576, 1536), (1, 2048, 8192), (1, 4096, 11008), (4, 4096, 14336),
                                   (3, 96, 32), (1, 64, 96)])
@pytest.mark.parametrize("cores", [1, 8, 48])
def test_qffn_rows_q8_tiling(emu, chip, T, d, I, cores):
    rc, t = emu.qffn_rows_q8_tiling(chip, T, d, I, cores)
    assert rc == 0, t
    assert t["ubLimit"] == CHIPS[chip] and t["ubBytes"] <= t["ubLimit"] and t["redUbBytes"] <= t["ubLimit"]
    nb = I // 32                                                  # 32-neuron blocks: h is rounded per block
    assert t["blockDim"] <= cores and t["blockDim"] * t["bPerCore"] >= nb > (t["blockDim"] - 1) * t["bPerCore"]
    assert t["nbxPad"] % 8 == 0 and 0 <= t["nbxPad"] - d // 32 < 8
    assert t["nTile"] % 64 == 0 and 64 <= t["nTile"] <= 256 and t["nList"] % 8 == 0
    assert t["redCols"] % 8 == 0 and t["redBlockDim"] * t["redCols"] >= d > (t["redBlockDim"] - 1) * t["redCols"]
    assert t["wsBytes"] == T * t["blockDim"] * d * 4 + T * t["blockDim"] * 32


def test_qffn_rows_q8_tiling_rejects(emu):
    assert emu.qffn_rows_q8_tiling("310B", 1, 100, 64, 8)[0] == 1    # d not a multiple of 32 (q8_0 blocks)
    assert emu.qffn_rows_q8_tiling("310B", 1, 64, 48, 8)[0] == 1     # I not a multiple of 32 (W_down blocks)
    assert emu.qffn_rows_q8_tiling("310B", 0, 64, 64, 8)[0] == 1
    assert emu.qffn_rows_q8_tiling("910B", 1, 8192, 64, 8)[0] == 2   # SD_ERR_UB: rows of 8192 do not fit
    assert emu.qffn_rows_q8_tiling("310B", 1, 4096, 64, 8)[0] == 0


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("T,H,D", [(1, 3, 64), (512, 8, 128), (100000, 2, 64), (7, 5, 40), (64, 32, 256)])
def test_delta_encode_tiling(emu, chip, T, H, D):
    rc, t = emu.delta_encode_tiling(chip, T, H, D, 8)
    assert rc == 0
    assert t["ubBytes"] <= t["ubLimit"] == CHIPS[chip]
    assert t["dPad"] % 64 == 0 and t["dPad"] >= D
    assert 1 <= t["maxTokens"] <= min(T, 4096)
    assert t["blockDim"] == min(H, 8)


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("H,Hq,D,n", [(3, 9, 64, 1), (8, 32, 128, 4096), (1, 32, 256, 100000), (2, 4, 40, 77)])
def test_delta_attention_tiling(emu, chip, H, Hq, D, n):
    rc, t = emu.delta_attn_tiling(chip, H, Hq, D, n, 8)
    assert rc == 0
    assert t["ubBytes"] <= t["ubLimit"] == CHIPS[chip]
    assert t["G"] == Hq // H
    assert t["chunk"] % 64 == 0 and t["entTile"] % 32 == 0
    assert t["nPad"] % 64 == 0 and t["nPad"] >= n
    assert t["wsBytes"] == Hq * t["nPad"] * 4


def test_delta_tiling_rejects(emu):
    assert emu.delta_encode_tiling("310B", 1, 1, 512, 8)[0] == 1     # D > 256: uint8 channel ids
    assert emu.delta_attn_tiling("310B", 3, 4, 64, 10, 8)[0] == 1    # Hq not a multiple of H


# ------------------------------------------------------- the kernels reserve exactly what the tiling budgeted
def _f16(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).half()


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("mode,T,d,r,I", [("fused", 1, 576, 32, 1536), ("fused", 3, 72, 20, 300),
                                          ("rows", 2, 200, 8, 400), ("predict", 3, 96, 24, 700)])
def test_ffn_kernels_reserve_the_tiled_ub(emu, chip, mode, T, d, r, I):
    g = torch.Generator().manual_seed(0)
    x, wg, wu, wd = _f16(g, T, d), _f16(g, I, d, scale=0.1), _f16(g, I, d, scale=0.1), _f16(g, I, d, scale=0.1)
    kw = dict(p1=_f16(g, r, d, scale=0.1), p2=_f16(g, I, r, scale=0.3), bias=torch.randn(I, generator=g))
    if mode == "rows":
        kw = dict(idx=torch.arange(I, dtype=torch.int32).repeat(T, 1),
                  count=torch.full((T,), I // 2, dtype=torch.int32))
    res = emu.ffn(mode, x, wg, wu, wd, activation="silu", chip=chip, cores=4, **kw)
    _, t = emu.ffn_tiling(chip, mode, T, d, r if mode != "rows" else 0, I, 4)
    assert res["ub"] == (t["ubBytes"], t["redUbBytes"])


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("T,d,G,I", [(1, 256, 64, 700), (3, 96, 32, 300), (2, 160, 16, 130), (2, 512, 128, 200)])
def test_q4_kernels_reserve_the_tiled_ub(emu, chip, T, d, G, I):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (I, 2, d // 2), dtype=torch.uint8, generator=g)
    res = emu.ffn_predict_q4(_f16(g, T, d), q, torch.rand(I, 2, d // G, generator=g) * 0.05, torch.zeros(I),
                             chip=chip, cores=4)
    _, t = emu.ffn_q4_tiling(chip, T, d, G, I, 4)
    assert res["ub"] == (t["ubBytes"], t["concatUbBytes"])


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("T,d,I", [(1, 576, 1536), (3, 96, 64), (2, 256, 480)])
def test_qffn_kernels_reserve_the_tiled_ub(emu, chip, T, d, I):
    from sparsedge.ops.ffn import compact_active
    from sparsedge.quant import formats as qf
    g = torch.Generator().manual_seed(3)
    w = qf.quantize(torch.randn(2 * I, d, generator=g) / 8, "q8_0")
    idx, count = compact_active(torch.rand(T, I, generator=g) < 0.5)
    codes = torch.randint(-127, 128, (I, d), dtype=torch.int8, generator=g)
    scale = (torch.rand(I // 32, d, generator=g) * 0.01).half()
    res = emu.qffn_rows_q8(_f16(g, T, d), idx, count, w, codes, scale, activation="relu", chip=chip, cores=4)
    _, t = emu.qffn_rows_q8_tiling(chip, T, d, I, 4)
    assert res["ub"] == (t["ubBytes"], t["redUbBytes"])


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("H,Hq,D", [(2, 2, 64), (2, 8, 40), (1, 3, 128)])
@pytest.mark.parametrize("start", [0, 89])
def test_delta_kernels_reserve_the_tiled_ub(emu, chip, H, Hq, D, start):
    g = torch.Generator().manual_seed(2)
    Tmax, cap = 96, 96 * D
    ref, values = torch.zeros(H, D), torch.zeros(H, cap, dtype=torch.half)
    chan, offsets = torch.zeros(H, cap, dtype=torch.uint8), torch.zeros(H, Tmax + 1, dtype=torch.int32)
    k = _f16(g, start + 1, H, D)
    r = emu.delta_encode(k, ref, torch.full((H,), 0.5), values, chan, offsets, 0, chip=chip, cores=2)
    assert r["status"][0] == 0
    _, te = emu.delta_encode_tiling(chip, start + 1, H, D, 2)
    assert r["ub"] == te["ubBytes"]
    got = emu.delta_attention(_f16(g, 1, Hq, D), k[start:start + 1].contiguous(), _f16(g, H, Tmax, D), values, chan,
                              offsets, _f16(g, H, 4, D), _f16(g, H, 8, D), start, 4, 8, D ** -0.5, chip=chip, cores=2)
    _, t = emu.delta_attn_tiling(chip, H, Hq, D, start + 1, 2)
    assert got["ub"] == t["ubBytes"]
