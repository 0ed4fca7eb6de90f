"""Fused CPU sparse-FFN kernels vs the composite reference (sdk/sparsedge/ops/ffn.py)."""
import pytest
import torch

from sparsedge import ops
from sparsedge.backends import get_backend

get_backend("cpu")  # loads the kernel library
FUSED = ops.has_fused("sparse_ffn", "cpu")
pytestmark = pytest.mark.skipif(not FUSED, reason="CPU kernel library not built (python setup.py build_ext --inplace)")

ACTS = [("silu", 0.0, 0.0), ("silu", 0.0, 0.15), ("gelu", 0.0, 0.1), ("gelu_tanh", 0.0, 0.0), ("relu", 0.0, 0.0),
        ("fatrelu", 0.1, 0.0), ("drelu", 0.0, 0.0), ("relu2", 0.0, 0.0)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weights(I, d, r, dtype, bias_shift):
    p1 = torch.randn(r, d).to(dtype)
    p2 = (torch.randn(I, r) / r ** 0.5).to(dtype)
    bias = torch.randn(I) + bias_shift
    wg, wu, wd = (torch.randn(I, d) / d ** 0.5 for _ in range(3))
    return p1, p2, bias, wg.to(dtype), wu.to(dtype), wd.to(dtype)


def _tol(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,param,tau", ACTS)
def test_fused_matches_reference(dtype, act, param, tau):
    T, d, I, r = 3, 72, 300, 20  # d not a multiple of 16 and I not of 256: exercises every tail
    x = torch.randn(T, d).to(dtype)
    p1, p2, bias, wg, wu, wd = _weights(I, d, r, dtype, 0.0)
    y, c, dc = torch.ops.sparsedge.sparse_ffn(x, p1, p2, bias, wg, wu, wd, act, param, tau)
    yr, cr, dcr = ops.reference("sparse_ffn")(x, p1, p2, bias, wg, wu, wd, act, param, tau)
    assert y.dtype == x.dtype and y.shape == (T, d)
    assert torch.equal(c, cr)
    exact_zeros = act not in ("silu", "gelu", "gelu_tanh") or tau > 0
    if exact_zeros:
        assert (dc - dcr).abs().max() <= (0 if dtype == torch.float32 else 2)
    torch.testing.assert_close(y.float(), yr.float(), atol=_tol(dtype) * yr.float().abs().max().item(), rtol=_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shift", [-1e30, -2.0, 0.0, 2.0, 1e30], ids=["empty", "sparse", "half", "dense", "full"])
def test_densities_incl_empty_and_full(dtype, shift):
    T, d, I, r = 5, 64, 520, 16
    x = torch.randn(T, d).to(dtype)
    p1, p2, bias, wg, wu, wd = _weights(I, d, r, dtype, shift)
    idx, count = torch.ops.sparsedge.ffn_predict(x, p1, p2, bias)
    idx_r, count_r = ops.reference("ffn_predict")(x, p1, p2, bias)
    assert torch.equal(count, count_r)
    for t in range(T):
        assert torch.equal(idx[t, :count[t]], idx_r[t, :count_r[t]])
    if shift <= -1e30:
        assert int(count.sum()) == 0
    if shift >= 1e30:
        assert int(count.min()) == I
    y, dc = torch.ops.sparsedge.sparse_ffn_rows(x, idx, count, wg, wu, wd, "relu", 0.0, 0.0)
    yr, dcr = ops.reference("sparse_ffn_rows")(x, idx_r, count_r, wg, wu, wd, "relu", 0.0, 0.0)
    assert torch.equal(dc, dcr)
    torch.testing.assert_close(y.float(), yr.float(), atol=_tol(dtype) * max(yr.float().abs().max().item(), 1e-3),
                               rtol=_tol(dtype))
    if shift <= -1e30:
        assert not y.float().any()


@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("d,I", [(8, 16), (576, 1536), (130, 1000)])
def test_shapes_and_thread_independence(T, d, I):
    r = 8
    x = torch.randn(T, d)
    p1, p2, bias, wg, wu, wd = _weights(I, d, r, torch.float32, -0.5)
    y, c, dc = torch.ops.sparsedge.sparse_ffn(x, p1, p2, bias, wg, wu, wd, "silu", 0.0, 0.05)
    yr, cr, dcr = ops.reference("sparse_ffn")(x, p1, p2, bias, wg, wu, wd, "silu", 0.0, 0.05)
    assert torch.equal(c, cr) and torch.equal(dc, dcr)
    torch.testing.assert_close(y, yr, atol=1e-5 * max(yr.abs().max().item(), 1e-3), rtol=1e-5)
    # per-token results do not depend on batching (prefill per token == decode one by one)
    ys = torch.cat([torch.ops.sparsedge.sparse_ffn(x[t:t + 1], p1, p2, bias, wg, wu, wd, "silu", 0.0, 0.05)[0]
                    for t in range(T)])
    assert torch.equal(ys, y)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = torch.ops.sparsedge.sparse_ffn(x, p1, p2, bias, wg, wu, wd, "silu", 0.0, 0.05)[0]
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y)


def test_rows_rejects_bad_indices():
    d, I = 16, 32
    x = torch.randn(1, d)
    w = torch.randn(I, d)
    idx = torch.tensor([[0, I + 3]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.sparsedge.sparse_ffn_rows(x, idx, torch.tensor([2], dtype=torch.int32), w, w, w, "relu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.sparsedge.sparse_ffn_rows(x, idx, torch.tensor([1], dtype=torch.int32), w, w, w, "tanh", 0.0, 0.0)


def test_predictor_dtype_mix():
    """fp32 predictors with bf16 weights (and bf16 x) are accepted."""
    T, d, I, r = 2, 32, 64, 8
    x = torch.randn(T, d).bfloat16()
    p1, p2, bias, wg, wu, wd = _weights(I, d, r, torch.bfloat16, 0.0)
    y, c, _ = torch.ops.sparsedge.sparse_ffn(x, p1.float(), p2.float(), bias, wg, wu, wd, "relu", 0.0, 0.0)
    yr, cr, _ = ops.reference("sparse_ffn")(x, p1.float(), p2.float(), bias, wg, wu, wd, "relu", 0.0, 0.0)
    assert torch.equal(c, cr)
    torch.testing.assert_close(y.float(), yr.float(), atol=0.05, rtol=0.02)
