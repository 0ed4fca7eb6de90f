"""GGUF block formats (sdk/sparsedge/quant/formats.py) and the qlinear op (sdk/sparsedge/ops/quant.py).

- dequantize is bit-identical to gguf.quants.dequantize for every format, on fully random bytes (NaN, inf
  and subnormal fp16 scales included), all-zero blocks and chosen fp16 scale edge values;
- quantize is bit-identical to gguf.quants.quantize for q8_0 / q4_0 / q4_1 (and the float formats), on
  rounding midpoints, ties of the largest |w|, zero / tiny / fp16-overflowing blocks;
- the fused CPU kernel against the composite reference over sparsedge.ops.quant.CASES, with the bound the
  int8 rounding of x allows, and against quant.int8_reference (x rounded the kernels' way, sums in fp64)
  to fp32-accumulation accuracy;
- Meta shapes and the errors (wrong shapes, K not a multiple of the block, unknown qtype).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from sparsedge import ops
from sparsedge.backends import get_backend
from sparsedge.ops import quant as oq
from sparsedge.quant import formats as qf
from sparsedge.testing.quant import case_inputs, random_blocks

get_backend("cpu")  # loads the kernel library
FUSED = ops.has_fused("qlinear", "cpu")
needs_fused = pytest.mark.skipif(not FUSED, reason="CPU kernel library not built (pip install --no-build-isolation -e .)")

G = gguf.GGMLQuantizationType
ALL = list(qf.SUPPORTED)
# fp16 bit patterns for the scale fields: +-0, smallest / largest subnormal, 1, largest finite, inf, nan
F16_EDGES = [0x0000, 0x8000, 0x0001, 0x03FF, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00]


def _ggml(qtype: str):
    return G(qf.get_format(qtype).ggml_type)


def _assert_bits_equal(ours: np.ndarray, ref: np.ndarray):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    nan_o, nan_r = np.isnan(ours), np.isnan(ref)
    assert np.array_equal(nan_o, nan_r), "NaN positions differ"
    a, b = ours[~nan_o].view(np.uint32), ref[~nan_r].view(np.uint32)
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, f"{bad.size} values differ, first: ours {ours[~nan_o][bad[0]]!r} ref {ref[~nan_r][bad[0]]!r}"


def test_format_table_matches_gguf():
    for name, fmt in qf.FORMATS.items():
        t = G(fmt.ggml_type)
        assert t.name.lower() == name
        assert gguf.GGML_QUANT_SIZES[t] == (fmt.block, fmt.type_size)
        assert qf.qtype_from_ggml(t) == qf.qtype_from_ggml(int(t)) == name
        assert qf.get_format(t.name) is fmt
    assert qf.row_bytes("q4_1", 576) == 360 and qf.row_bytes("q6_k", 512) == 420


def test_unsupported_type_error_names_it_and_lists_supported():
    for bad in ("q5_k", G.Q5_K, int(G.IQ2_XXS)):
        with pytest.raises(qf.UnsupportedQuantError) as ei:
            qf.get_format(bad)
        msg = str(ei.value)
        assert "\n" not in msg and all(s in msg for s in qf.SUPPORTED)
    assert "Q5_K" in str(pytest.raises(ValueError, qf.get_format, G.Q5_K).value)
    with pytest.raises(qf.UnsupportedQuantError, match="q4_k.*supports"):
        qf.quantize(torch.zeros(1, 256), "q4_k")


@pytest.mark.parametrize("qtype", ALL)
def test_dequantize_bit_exact(qtype):
    fmt = qf.get_format(qtype)
    rng = np.random.default_rng(fmt.ggml_type)
    K = 2 * fmt.block if fmt.quantized else 64
    rb = fmt.row_bytes(K)
    raw = rng.integers(0, 256, (24, rb), dtype=np.uint8)  # anything: NaN / inf / subnormal scales included
    raw[0] = 0                                            # all-zero blocks
    if fmt.quantized:
        # chosen fp16 values in every scale field of rows 1..len(F16_EDGES)
        offsets = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q4_k": [0, 2], "q6_k": [208], "tq2_0": [64]}[qtype]
        blocks = raw.reshape(24, K // fmt.block, fmt.type_size)
        for i, bits in enumerate(F16_EDGES):
            for off in offsets:
                blocks[1 + i, :, off:off + 2] = np.array([bits], dtype=np.uint16).view(np.uint8)
    with np.errstate(all="ignore"):  # NaN / inf scales
        ref = gguf.quants.dequantize(raw, _ggml(qtype))
        ours = qf.dequantize(torch.from_numpy(raw), qtype, K).numpy()
    _assert_bits_equal(ours, ref.reshape(ours.shape))
    # a 1-D row and a [.., rb] stack work too
    assert qf.dequantize(torch.from_numpy(raw[3]), qtype, K).shape == (K,)


def _quantize_inputs(K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(K)
    rows = [torch.randn(K, generator=g) * s for s in (1e-3, 0.05, 1.0, 30.0)]
    rows.append(torch.zeros(K))
    rows.append(torch.full((K,), 1e-7))                 # fp16-subnormal scale
    rows.append(torch.randn(K, generator=g) * 1e7)      # scale overflows fp16 -> inf
    tie = torch.randn(K, generator=g)
    tie[3], tie[9] = 5.0, -5.0                          # largest |w| twice, opposite signs (q4_0 takes the first)
    rows.append(tie)
    tie2 = tie.clone()
    tie2[3], tie2[9] = -5.0, 5.0
    rows.append(tie2)
    # exact rounding midpoints of q8_0 (d = 1 / 127 * 127): k + 0.5, and 0.49999997 just below
    mid = (torch.arange(K) % 64 - 32).float() + 0.5
    mid[0] = 127.0
    rows.append(mid)
    near = torch.full((K,), 0.49999997)
    near[0] = 127.0
    rows.append(near)
    rows.append(torch.linspace(-3, 7, K))               # uneven min / max (q4_1)
    rows.append(-torch.rand(K, generator=g))            # all negative
    return torch.stack(rows)


@pytest.mark.parametrize("qtype", list(qf.QUANTIZABLE))
def test_quantize_bit_exact(qtype):
    w = _quantize_inputs(128)
    with np.errstate(all="ignore"):  # the fp16 overflow row
        ref = gguf.quants.quantize(w.numpy(), _ggml(qtype))
    ours = qf.quantize(w, qtype)
    assert ours.dtype == torch.uint8 and ours.shape == (w.shape[0], qf.row_bytes(qtype, 128))
    assert np.array_equal(ours.numpy(), ref.view(np.uint8).reshape(ours.shape))


def test_quantize_activations_rounding():
    x = torch.randn(3, 96) * 4
    x[1, 32:64] = 0
    q, d, s = qf.quantize_activations(x)
    assert q.dtype == torch.int8 and d.shape == s.shape == (3, 3)
    assert int(q.abs().max()) == 127 and torch.all(q[1, 32:64] == 0) and d[1, 1] == 0 and s[1, 1] == 0
    xh = q.float().reshape(3, 3, 32) * d[..., None]
    assert torch.all((xh.reshape(3, 96) - x).abs() <= d.repeat_interleave(32, 1) / 2 * (1 + 1e-6))
    torch.testing.assert_close(s, d * q.float().reshape(3, 3, 32).sum(-1), rtol=0, atol=0)


def _rounding_bound(x: torch.Tensor, w: torch.Tensor, qtype: str, K: int) -> torch.Tensor:
    """Largest |y_fused - y_ref| the int8 rounding of x allows: sum_b (amax_b / 254) * sum_{e in b} |W_ne|."""
    W = qf.dequantize(w, qtype, K).double().abs()
    x2 = x.reshape(-1, K).double()
    if not qf.get_format(qtype).quantized:
        return torch.zeros(x2.shape[0], W.shape[0], dtype=torch.float64)
    half_step = x2.reshape(x2.shape[0], -1, qf.QK).abs().amax(-1) / 254  # [T, K/32]
    return half_step.repeat_interleave(qf.QK, 1) @ W.t()


GEMM_TOKENS = 32  # backends/cpu/quant_linear.cpp kGemmTokens


def _bf16_gemm() -> bool:
    try:
        from sparsedge.backends import _cpu_kernels
    except ImportError:
        return False
    return _cpu_kernels.bf16_gemm()


BF16_GEMM = _bf16_gemm()


@needs_fused
@pytest.mark.parametrize("case", oq.QCASES, ids=[f"{c.qtype}-N{c.N}-K{c.K}-T{c.T}-{str(c.dtype)[6:]}" for c in oq.QCASES])
def test_qlinear_fused_matches_reference(case):
    x, w = case_inputs(case, seed=case.N + case.K + case.T)
    y = torch.ops.sparsedge.qlinear(x, w, case.qtype, case.K)
    ref = ops.reference("qlinear")(x, w, case.qtype, case.K)
    assert y.shape == ref.shape == (case.T, case.N) and y.dtype == ref.dtype == x.dtype
    W = qf.dequantize(w, case.qtype, case.K).double()
    mag = x.double().abs() @ W.abs().t()  # sum |x| |W|: the scale of fp32 accumulation error
    out_round = y.double().abs() * (2.0 ** -8 if case.dtype == torch.bfloat16 else 0.0)
    # prefill GEMMs with AVX512-BF16 round x and the rows to bf16 once (2^-9 each, relative)
    gemm = case.T >= GEMM_TOKENS if qf.get_format(case.qtype).quantized else case.T > 8 and case.qtype == "bf16"
    bf16 = 2.0 ** -8 * mag if gemm and BF16_GEMM else 0.0
    # vs the composite definition: the int8 rounding of x, bounded exactly
    err = (y.double() - ref.double()).abs()
    bound = _rounding_bound(x, w, case.qtype, case.K) + 2e-6 * mag + 2 * out_round + (
        bf16 if not qf.get_format(case.qtype).quantized else 0.0)
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item():.3e}"
    # vs the same arithmetic computed exactly: fp32 accumulation error only. Decode-sized calls round x to int8 like
    # llama.cpp; from GEMM_TOKENS tokens on the kernel widens the rows and multiplies fp32 x (the reference itself)
    tight = (qf.int8_reference(x, w, case.qtype, case.K) if case.T < GEMM_TOKENS
             else x.double() @ qf.dequantize(w, case.qtype, case.K).double().t())
    err = (y.double() - tight).abs()
    assert torch.all(err <= 1e-6 * mag + bf16 + out_round), f"max {(err / mag).max().item():.3e} of sum|x||W|"


@needs_fused
def test_qlinear_leading_dims_and_empty():
    x, w = case_inputs(oq.QCase("q4_1", 10, 64, 6))
    y = torch.ops.sparsedge.qlinear(x.reshape(2, 3, 64), w, "q4_1", 64)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y.reshape(6, 10), torch.ops.sparsedge.qlinear(x, w, "q4_1", 64), rtol=0, atol=0)
    assert torch.ops.sparsedge.qlinear(x[:0], w, "q4_1", 64).shape == (0, 10)


@needs_fused
def test_qlinear_threads_agree():
    """Each output is one row's dot product whatever the split: bit-identical at 1 and 2 threads."""
    case = oq.QCase("q8_0", 301, 576, 3)
    x, w = case_inputs(case)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = [torch.ops.sparsedge.qlinear(x[: t], w, "q8_0", 576) for t in (1, 3)]
        torch.set_num_threads(2)
        y2 = [torch.ops.sparsedge.qlinear(x[: t], w, "q8_0", 576) for t in (1, 3)]
    finally:
        torch.set_num_threads(n)
    for a, b in zip(y1, y2):
        assert torch.equal(a, b)


def test_meta_shapes():
    for case in (oq.QCase("q4_k", 7, 512, 3), oq.QCase("q8_0", 5, 64, 1), oq.QCase("bf16", 3, 10, 2)):
        x = torch.empty(2, case.T, case.K, device="meta")
        w = torch.empty(case.N, qf.row_bytes(case.qtype, case.K), dtype=torch.uint8, device="meta")
        y = torch.ops.sparsedge.qlinear(x, w, case.qtype, case.K)
        assert y.device.type == "meta" and y.shape == (2, case.T, case.N) and y.dtype == x.dtype


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_qlinear_errors(device):
    x = torch.randn(2, 64, device=device)
    w = torch.zeros(4, 40, dtype=torch.uint8, device=device)  # q4_1 rows of K=64
    op = torch.ops.sparsedge.qlinear
    with pytest.raises(ValueError, match="unsupported quantization type 'q5_k'.*q8_0"):
        op(x, w, "q5_k", 64)
    with pytest.raises(ValueError, match="multiple of its block size 32"):
        op(x[:, :48], w, "q4_1", 48)
    with pytest.raises(ValueError, match="multiple of its block size 256"):
        op(x, w, "q4_k", 64)
    with pytest.raises(ValueError, match=r"w must be uint8 \[N, 40\]"):
        op(x, w[:, :38], "q4_1", 64)
    with pytest.raises(ValueError, match="w must be uint8"):
        op(x, w.float(), "q4_1", 64)
    with pytest.raises(ValueError, match=r"x must be a float tensor \[\.\.\., 64\]"):
        op(x[:, :32], w, "q4_1", 64)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        op(x.to(torch.int32), w, "q4_1", 64)
    assert op(x, w, "Q4_1", 64).shape == (2, 4)  # qtype names are case-insensitive


def test_composite_reference_is_dequantize_then_matmul():
    x, w = case_inputs(oq.QCase("q6_k", 9, 512, 2))
    W = qf.dequantize(w, "q6_k", 512)
    torch.testing.assert_close(ops.reference("qlinear")(x, w, "q6_k", 512), x @ W.t(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", oq.QCASES, ids=[f"{c.qtype}-N{c.N}-K{c.K}-T{c.T}-{str(c.dtype)[6:]}" for c in oq.QCASES])
def test_qlinear_cuda_matches_reference(case):
    """cuda_ops/quant.cu: the same bounds as the CPU kernel (x rounded the same way, fp32 sums)."""
    get_backend("cuda")
    if not ops.has_fused("qlinear", "cuda"):
        pytest.skip("CUDA kernel library not built")
    x, w = case_inputs(case, seed=case.N + case.K + case.T)
    y = torch.ops.sparsedge.qlinear(x.cuda(), w.cuda(), case.qtype, case.K).cpu()
    assert y.shape == (case.T, case.N) and y.dtype == x.dtype
    W = qf.dequantize(w, case.qtype, case.K).double()
    mag = x.double().abs() @ W.abs().t()
    out_round = y.double().abs() * (2.0 ** -8 if case.dtype == torch.bfloat16 else 0.0)
    err = (y.double() - qf.int8_reference(x, w, case.qtype, case.K)).abs()
    assert torch.all(err <= 1e-6 * mag + out_round), f"max {(err / mag).max().item():.3e} of sum|x||W|"
