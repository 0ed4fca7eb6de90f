"""Fused CPU delta kernels vs the composite reference (sdk/sparsedge/ops/delta.py).

Tolerances: delta_encode must be bit-identical (same fp32 arithmetic in the same order per channel);
delta_attention agrees to 1e-4 absolute in fp32 (the reference builds k_hat by a cumsum and then q.k_hat,
the kernel sums q.d_j token by token; softmax/P.V in a different order) and 2e-2 with a bf16 cache
(the kernel and the reference round the same bf16 inputs but the fp32 output is rounded to bf16).
"""
from __future__ import annotations

import pytest
import torch

import sparsedge.backends.cpu  # noqa: F401
from sparsedge import ops as sops
from sparsedge.backends import get_backend

ops = torch.ops.sparsedge
pytestmark = pytest.mark.skipif(not sops.has_fused("delta_attention", "cpu") and
                                get_backend("cpu").kernel_error is not None,
                                reason="CPU kernel library not built")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def walk_keys(T, H, D, step=0.3, seed=0):
    """Keys with temporal correlation: a Gaussian random walk along the token axis."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, H, D, generator=g) + (torch.randn(T, H, D, generator=g) * step).cumsum(0)


class State:
    def __init__(self, H, D, Tmax, cap, S, W, dtype):
        self.ref = torch.zeros(H, D)
        self.values = torch.zeros(H, cap, dtype=dtype)
        self.chan = torch.zeros(H, cap, dtype=torch.uint8)
        self.offsets = torch.zeros(H, Tmax + 1, dtype=torch.int32)
        self.sink_k = torch.zeros(H, S, D, dtype=dtype)
        self.window_k = torch.zeros(H, W, D, dtype=dtype)
        self.v_cache = torch.zeros(H, Tmax, D, dtype=dtype)

    def clone(self):
        c = object.__new__(State)
        c.__dict__ = {k: v.clone() for k, v in self.__dict__.items()}
        return c


def run_chunks(fused: bool, Hq, H, D, S, W, theta, dtype, chunks, seed=0):
    """Encode + attend chunk after chunk (prefill chunks with start > 0 and single-token decode steps)."""
    g = torch.Generator().manual_seed(seed + 1)
    Tmax = sum(chunks)
    keys = walk_keys(Tmax, H, D, seed=seed).to(dtype)
    st = State(H, D, Tmax, Tmax * D, S, W, dtype)
    th = torch.full((H,), float(theta))
    enc = ops.delta_encode if fused else sops.reference("delta_encode")
    att = ops.delta_attention if fused else sops.reference("delta_attention")
    outs, start = [], 0
    for T in chunks:
        q = torch.randn(T, Hq, D, generator=g).to(dtype)
        v = torch.randn(T, H, D, generator=g).to(dtype)
        k = keys[start:start + T]
        st.v_cache[:, start:start + T] = v.transpose(0, 1)
        nnz = enc(k, st.ref, th, st.values, st.chan, st.offsets, start)
        if start < S:
            m = min(S, start + T)
            st.sink_k[:, start:m] = k[:m - start].transpose(0, 1)
        outs.append((att(q, k, st.v_cache, st.values, st.chan, st.offsets, st.sink_k, st.window_k, start, S, W,
                         D ** -0.5), nnz))
        for j in range(max(start, start + T - W), start + T):
            st.window_k[:, j % W] = k[j - start]
        start += T
    return outs, st


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,H", [(3, 3), (9, 3), (8, 2)])  # GQA ratios 1, 3, 4
@pytest.mark.parametrize("S,W", [(4, 16), (0, 0), (0, 8), (3, 0), (2, 200)])
@pytest.mark.parametrize("theta", [0.0, 0.4, 1e9])  # 1e9: every delta empty
def test_fused_equals_reference(dtype, Hq, H, S, W, theta):
    D = 64
    chunks = [37, 1, 1, 20, 1, 1]  # prefill, decode, decode, prefill chunk at start > 0, decode, decode
    fused, st_f = run_chunks(True, Hq, H, D, S, W, theta, dtype, chunks)
    ref, st_r = run_chunks(False, Hq, H, D, S, W, theta, dtype, chunks)
    assert torch.equal(st_f.offsets, st_r.offsets)
    assert torch.equal(st_f.values, st_r.values) and torch.equal(st_f.chan, st_r.chan)
    assert torch.equal(st_f.ref, st_r.ref)
    for (of, nf), (orr, nr) in zip(fused, ref):
        assert torch.equal(nf, nr)
        assert of.dtype == orr.dtype and of.shape == orr.shape
        torch.testing.assert_close(of.float(), orr.float(), atol=TOL[dtype], rtol=TOL[dtype])
    if theta >= 1e9:
        assert int(st_f.offsets[:, -1].sum()) == 0


@pytest.mark.parametrize("D", [32, 128])
def test_fused_other_head_dims_and_fp16(D):
    for dtype in (torch.float32, torch.float16):
        fused, _ = run_chunks(True, 4, 2, D, 2, 4, 0.3, dtype, [9, 1, 5])
        ref, _ = run_chunks(False, 4, 2, D, 2, 4, 0.3, dtype, [9, 1, 5])
        for (of, _), (orr, _) in zip(fused, ref):
            torch.testing.assert_close(of.float(), orr.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_theta_zero_is_dense_attention():
    """theta = 0 with no window and no sinks: every score goes through the deltas, and still equals
    dense causal attention to 1e-4 (fp32)."""
    Hq, H, D, T = 8, 2, 64, 300
    (out, _), = [o for o in run_chunks(True, Hq, H, D, 0, 0, 0.0, torch.float32, [T])[0]]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(T, Hq, D, generator=g)
    v = torch.randn(T, H, D, generator=g)
    k = walk_keys(T, H, D)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True,
        scale=D ** -0.5, enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)


def test_encode_overflow_raises_without_writing_past_capacity():
    H, D, cap = 2, 64, 100
    st = State(H, D, 10, cap, 0, 0, torch.float32)
    k = torch.randn(3, H, D) * 5
    with pytest.raises(RuntimeError, match="capacity exceeded"):
        ops.delta_encode(k, st.ref, torch.zeros(H), st.values, st.chan, st.offsets, 0)
    assert int(st.offsets.max()) <= cap


def test_attention_rejects_offsets_outside_buffer():
    H, D = 1, 64
    st = State(H, D, 4, 8, 0, 0, torch.float32)
    st.offsets[:, 1:] = 1000
    with pytest.raises(RuntimeError, match="outside the packed buffer"):
        ops.delta_attention(torch.randn(1, 1, D), torch.randn(1, 1, D), st.v_cache, st.values, st.chan, st.offsets,
                            st.sink_k, st.window_k, 0, 0, 0, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,H,S,W,D", [(9, 3, 4, 64, 64), (3, 3, 0, 0, 64), (8, 1, 2, 30, 48), (8, 2, 4, 16, 64)])
def test_split_key_decode_path_equals_reference(dtype, Hq, H, S, W, D):
    """Long-context decode (n >= 1024, T = 1, several threads) takes the split-K path: same answers as the
    reference, any chunking."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chunks = [1100, 1, 1]
        fused, _ = run_chunks(True, Hq, H, D, S, W, 0.4, dtype, chunks)
        ref, _ = run_chunks(False, Hq, H, D, S, W, 0.4, dtype, chunks)
    finally:
        torch.set_num_threads(prev)
    for (of, _), (orr, _) in list(zip(fused, ref))[1:]:
        torch.testing.assert_close(of.float(), orr.float(), atol=TOL[dtype], rtol=TOL[dtype])
