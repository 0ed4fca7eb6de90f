"""What the npu backend runs when the AscendC library is missing: the composite references of the op schema
(plain torch ops: matmul, index_select, argsort, cumsum, softmax), which torch_npu would execute with its own
kernels. Here they run on CPU tensors in the NPU's dtype (fp16) against independent dense formulations, and the
backend's fallback reporting (one loud warning per missing kernel, doctor info) is checked."""
from __future__ import annotations

import math

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loguru import logger

from sparsedge import ops
from sparsedge.backends import npu

NPU_DTYPE = torch.float16


def ffn_weights(T=3, d=64, r=16, I=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(NPU_DTYPE)
    p1 = (torch.randn(r, d, generator=g) / 8).to(NPU_DTYPE)
    p2 = (torch.randn(I, r, generator=g) / 4).to(NPU_DTYPE)
    bias = torch.randn(I, generator=g) * 0.3
    wg, wu, wd = [(torch.randn(I, d, generator=g) / 8).to(NPU_DTYPE) for _ in range(3)]
    return x, p1, p2, bias, wg, wu, wd


def dense_masked_ffn(x, mask, wg, wu, wd):
    xf = x.float()
    h = F.silu(xf @ wg.float().t()) * (xf @ wu.float().t()) * mask
    return h @ wd.float()


def test_composite_sparse_ffn_equals_masked_dense_ffn():
    x, p1, p2, bias, wg, wu, wd = ffn_weights()
    y, count, down = ops.reference("sparse_ffn")(x, p1, p2, bias, wg, wu, wd, "silu", 0.0, 0.0)
    scores = (x.float() @ p1.float().t()) @ p2.float().t() + bias
    mask = (scores > 0).float()
    assert torch.equal(count, mask.sum(-1).int())
    torch.testing.assert_close(y.float(), dense_masked_ffn(x, mask, wg, wu, wd), atol=3e-3, rtol=3e-3)
    assert y.dtype == NPU_DTYPE and torch.equal(down, count)


def test_composite_sparse_ffn_full_density_is_dense():
    x, p1, p2, _, wg, wu, wd = ffn_weights(seed=1)
    bias = torch.full((wg.shape[0],), 1e4)
    y, count, _ = ops.reference("sparse_ffn")(x, p1, p2, bias, wg, wu, wd, "silu", 0.0, 0.0)
    assert int(count.min()) == wg.shape[0]
    torch.testing.assert_close(y.float(), dense_masked_ffn(x, torch.ones(1), wg, wu, wd), atol=3e-3, rtol=3e-3)


def test_composite_predict_lists_ascending_active_ids():
    x, p1, p2, bias, *_ = ffn_weights(seed=2)
    idx, count = ops.reference("ffn_predict")(x, p1, p2, bias)
    scores = (x.float() @ p1.float().t()) @ p2.float().t() + bias
    for t in range(x.shape[0]):
        assert idx[t, : count[t]].tolist() == (scores[t] > 0).nonzero().flatten().tolist()


def dense_attention(q, keys, v, scale):
    # q [Hq, D], keys/v [H, n, D]
    H = keys.shape[0]
    G = q.shape[0] // H
    s = torch.einsum("hgd,hnd->hgn", q.float().reshape(H, G, -1), keys.float()) * scale
    return torch.einsum("hgn,hnd->hgd", s.softmax(-1), v.float()).reshape(q.shape[0], -1)


@pytest.mark.parametrize("theta", [0.0, 0.5])
def test_composite_delta_roundtrip_and_attention(theta):
    H, Hq, D, T = 2, 4, 32, 40
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(T, H, D, generator=g) * 0.4).cumsum(0).to(NPU_DTYPE)
    v = torch.randn(H, T, D, generator=g).to(NPU_DTYPE)
    ref, values = torch.zeros(H, D), torch.zeros(H, T * D, dtype=NPU_DTYPE)
    chan, offsets = torch.zeros(H, T * D, dtype=torch.uint8), torch.zeros(H, T + 1, dtype=torch.int32)
    ops.reference("delta_encode")(k, ref, torch.full((H,), theta), values, chan, offsets, 0)
    from sparsedge.ops.delta import reconstruct_keys
    k_hat = reconstruct_keys(values, chan, offsets, T, D)
    err = (k_hat - k.float().transpose(0, 1)).abs().max()
    assert err <= theta + 0.02   # within theta per element (+ fp16 rounding of the stored deltas)
    q = torch.randn(1, Hq, D, generator=g).to(NPU_DTYPE)
    start = T - 1
    # window covering everything: exact attention over the true keys
    win = torch.zeros(H, T, D, dtype=NPU_DTYPE)
    for j in range(start):
        win[:, j % T] = k[j]
    out = ops.reference("delta_attention")(q, k[start:], v, values, chan, offsets, k[:0].transpose(0, 1), win,
                                           start, 0, T, 1 / math.sqrt(D))
    want = dense_attention(q[0], k.transpose(0, 1), v, 1 / math.sqrt(D))
    torch.testing.assert_close(out[0].float(), want, atol=3e-3, rtol=3e-3)
    # no window, no sinks: every score from the reconstructed keys
    out = ops.reference("delta_attention")(q, k[start:], v, values, chan, offsets, k[:0].transpose(0, 1), win[:, :0],
                                           start, 0, 0, 1 / math.sqrt(D))
    torch.testing.assert_close(out[0].float(), dense_attention(q[0], k_hat, v, 1 / math.sqrt(D)), atol=3e-3, rtol=3e-3)


# ----------------------------------------------------------------------------- backend fallback reporting
def bare_backend():
    b = npu.NPUBackend.__new__(npu.NPUBackend)   # torch.device("npu") needs torch_npu; skip __init__
    b._warned = set()
    b.kernel_path = None
    b.kernel_error = "libsparsedge_ascend.so not found"
    return b


def test_require_warns_once_per_missing_kernel():
    assert not ops.has_fused("sparse_ffn", "npu")
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    logger.enable("sparsedge")   # the package is quiet by default (sdk/__init__.py); the CLI enables it
    try:
        b = bare_backend()
        b.require("sparse_ffn", "delta_attention")
        b.require("sparse_ffn")
    finally:
        logger.disable("sparsedge")
        logger.remove(sink)
    assert len(lines) == 2
    assert "sparsedge::sparse_ffn" in lines[0] and "libsparsedge_ascend.so not found" in lines[0]
    assert "sparsedge::delta_attention" in lines[1]


def test_npu_kernels_and_offline_description():
    b = bare_backend()
    assert b.npu_kernels() == {name: False for name in npu.NPU_KERNEL_OPS}
    info = npu.NPUBackend.describe_offline()
    assert info["npu_kernels"] == {name: False for name in npu.NPU_KERNEL_OPS}
    assert info["reason"] and info["kernel_error"]
    # looked up as package data of sparsedge.backends (never relative to a source checkout)
    import sparsedge.backends
    pkg = Path(sparsedge.backends.__file__).resolve().parent
    assert any(Path(p).resolve() == pkg / npu.LIB_NAME for p in info["kernel_library_candidates"])


def test_library_lookup_errors_are_explicit(monkeypatch, tmp_path):
    monkeypatch.setattr(npu, "_torch_npu_import_error", lambda: None)
    monkeypatch.setenv(npu.ENV_LIB, str(tmp_path / "missing.so"))
    assert npu.load_kernel_library(force=True) is None
    assert "SPARSEDGE_ASCEND_LIB" in npu._state["error"]
    bad = tmp_path / "libsparsedge_ascend.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setenv(npu.ENV_LIB, str(bad))
    assert npu.load_kernel_library(force=True) is None
    assert "loading" in npu._state["error"] and "failed" in npu._state["error"]
    monkeypatch.undo()
    npu.load_kernel_library(force=True)
