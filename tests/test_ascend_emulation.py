"""The AscendC kernel sources (ascendc_ops/kernels/*.cpp), compiled by g++ against the host-emulation TEST HARNESS
(ascendc_ops/emulation/kernel_operator.h) and compared with sparsedge's composite reference over shapes, densities
and both chips' tilings. This checks the kernels' logic, not NPU execution: nothing here ran on an NPU."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from sparsedge.ops.delta import delta_attention_ref, delta_encode_ref
from sparsedge.ops.ffn import ffn_predict_q4_ref, ffn_predict_ref, q4_scores, sparse_ffn_ref, sparse_ffn_rows_ref

_spec = importlib.util.spec_from_file_location(
    "sparsedge_ascend_testutil", Path(__file__).resolve().parents[1] / "ascendc_ops" / "emulation" / "testutil.py")
tu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tu)

CHIPS = ("310B", "910B")


@pytest.fixture(scope="module")
def emu():
    m = tu.emu_module()
    if m.compiler() is None:
        tu.missing("no g++ to build the emulated kernels")
    return m.Emu()


# ------------------------------------------------------------------------------------ harness rules
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


# --------------------------------------------------------------------------------------- FFN
def make_ffn(T, d, r, I, density, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    p1 = (torch.randn(r, d, generator=g) / math.sqrt(d)).to(dtype)
    p2 = (torch.randn(I, r, generator=g) / math.sqrt(r)).to(dtype)
    # bias decides the active set: a random `density` share of neurons is on for every token
    on = torch.randperm(I, generator=g)[: int(round(density * I))]
    bias = torch.full((I,), -1e4)
    bias[on] = 1e4
    ws = [(torch.randn(I, d, generator=g) / math.sqrt(d)).to(dtype) for _ in range(2)]
    wd = (torch.randn(I, d, generator=g) / math.sqrt(max(1, density * I))).to(dtype)
    return x, p1, p2, bias, ws[0], ws[1], wd


def check_close(a, b, dtype):
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 576, 32, 1536), (3, 72, 20, 300)])
def test_sparse_ffn_fused(emu, chip, density, shape):
    T, d, r, I = shape
    x, p1, p2, bias, wg, wu, wd = make_ffn(T, d, r, I, density)
    res = emu.ffn("fused", x, wg, wu, wd, p1=p1, p2=p2, bias=bias, activation="relu", chip=chip, cores=4)
    y, count, down = sparse_ffn_ref(x, p1, p2, bias, wg, wu, wd, "relu", 0.0, 0.0)
    check_close(res["y"], y, x.dtype)
    assert torch.equal(res["count"], count)
    assert torch.equal(res["down_count"], down)
    _, t = emu.ffn_tiling(chip, "fused", T, d, r, I, 4)
    assert res["ub"] == (t["ubBytes"], t["redUbBytes"])   # the kernel reserves exactly what the tiling budgeted


@pytest.mark.parametrize("activation,act_param,tau", [
    ("silu", 0.0, 0.0), ("silu", 0.0, 0.05), ("gelu", 0.0, 0.0), ("gelu_tanh", 0.0, 0.03), ("relu", 0.0, 0.0),
    ("fatrelu", 0.1, 0.0), ("drelu", 0.0, 0.0), ("relu2", 0.0, 0.0)])
def test_sparse_ffn_activations(emu, activation, act_param, tau):
    x, p1, p2, bias, wg, wu, wd = make_ffn(2, 64, 16, 256, 0.5, seed=1)
    res = emu.ffn("fused", x, wg, wu, wd, p1=p1, p2=p2, bias=bias, activation=activation, act_param=act_param,
                  tau=tau, chip="310B", cores=3)
    y, count, down = sparse_ffn_ref(x, p1, p2, bias, wg, wu, wd, activation, act_param, tau)
    check_close(res["y"], y, x.dtype)
    assert torch.equal(res["count"], count) and torch.equal(res["down_count"], down)


def test_sparse_ffn_real_predictor_bf16_910b(emu):
    # a learned-looking predictor (bias around the score distribution) and bf16 on 910B
    x, p1, p2, _, wg, wu, wd = make_ffn(2, 128, 16, 512, 1.0, dtype=torch.bfloat16, seed=2)
    bias = torch.randn(512) * 0.2
    res = emu.ffn("fused", x, wg, wu, wd, p1=p1, p2=p2, bias=bias, activation="silu", chip="910B", cores=5)
    y, count, down = sparse_ffn_ref(x, p1, p2, bias, wg, wu, wd, "silu", 0.0, 0.0)
    assert torch.equal(res["count"], count)
    check_close(res["y"], y, x.dtype)


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("cores", [1, 3, 8])
def test_ffn_predict(emu, chip, cores):
    x, p1, p2, _, wg, wu, wd = make_ffn(3, 96, 24, 700, 1.0, seed=3)
    bias = torch.randn(700) * 0.5
    res = emu.ffn("predict", x, wg, wu, wd, p1=p1, p2=p2, bias=bias, chip=chip, cores=cores)
    idx, count = ffn_predict_ref(x, p1, p2, bias)
    assert torch.equal(res["count"], count)
    for t in range(3):
        assert torch.equal(res["idx"][t, : count[t]], idx[t, : count[t]])


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_sparse_ffn_rows(emu, chip, density):
    x, p1, p2, bias, wg, wu, wd = make_ffn(2, 200, 8, 400, density, seed=4)
    idx, count = ffn_predict_ref(x, p1, p2, bias)
    res = emu.ffn("rows", x, wg, wu, wd, idx=idx, count=count, activation="silu", tau=0.02, chip=chip, cores=3)
    y, down = sparse_ffn_rows_ref(x, idx, count, wg, wu, wd, "silu", 0.0, 0.02)
    check_close(res["y"], y, x.dtype)
    assert torch.equal(res["down_count"], down)


# ------------------------------------------------------------------------------------ ffn_predict_q4
def make_q4(T, d, G, I, density, dtype=torch.float16, seed=0, activation="silu", act_param=0.0):
    """x, q, scale, thresh with about `density` of the (token, neuron) pairs active (0 and 1 exactly)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    x[:, :G] = 0   # an all-zero group: amax = 0 -> inv = 0
    q = torch.randint(0, 256, (I, 2, d // 2), dtype=torch.uint8, generator=g)
    scale = torch.rand(I, 2, d // G, generator=g) * (0.5 / math.sqrt(d))
    scores = q4_scores(x, q, scale, activation, act_param)
    if density == 0.0:
        thresh = torch.full((I,), 1e30)
    elif density == 1.0:
        thresh = torch.full((I,), -1.0)   # scores are >= 0
    else:
        thresh = scores.flatten().quantile(1 - density) * (0.5 + torch.rand(I, generator=g))
    return x, q, scale, thresh.float(), scores


def check_q4(res, x, q, scale, thresh, scores, activation, act_param):
    """Kernel decisions (fp32 estimates) vs the reference (fp64 accumulation): ascending ids, and the same active set
    except for neurons whose reference score is within a small relative margin of the threshold."""
    idx, count = ffn_predict_q4_ref(x, q, scale, thresh, activation, act_param)
    T, I = scores.shape
    margin = 1e-4 * scores.abs().amax(-1, keepdim=True).clamp_min(1e-6)
    near = (scores - thresh).abs() <= margin
    flips = 0
    for t in range(T):
        n = int(res["count"][t])
        got = res["idx"][t, :n].long()
        assert n == 0 or (got[1:] > got[:-1]).all()
        gm = torch.zeros(I, dtype=torch.bool)
        gm[got] = True
        diff = gm ^ (scores[t] > thresh)
        assert not (diff & ~near[t]).any(), f"token {t}: {int((diff & ~near[t]).sum())} decisions off the boundary"
        flips += int(diff.sum())
    assert flips <= max(2, T * I // 500)      # the boundary cases stay rare
    return idx, count


@pytest.mark.parametrize("chip,dtype", [("310B", torch.float16), ("910B", torch.float16), ("910B", torch.bfloat16)])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 256, 64, 700), (3, 96, 32, 300), (2, 160, 16, 130), (2, 512, 128, 200)])
def test_ffn_predict_q4(emu, chip, dtype, density, shape):
    T, d, G, I = shape
    x, q, scale, thresh, scores = make_q4(T, d, G, I, density, dtype=dtype, seed=7)
    res = emu.ffn_predict_q4(x, q, scale, thresh, activation="silu", chip=chip, cores=4)
    _, count = check_q4(res, x, q, scale, thresh, scores, "silu", 0.0)
    if density in (0.0, 1.0):
        assert torch.equal(res["count"], count)
        assert all(torch.equal(res["idx"][t, : count[t]], torch.arange(I, dtype=torch.int32)[: count[t]])
                   for t in range(T))
    _, t = emu.ffn_q4_tiling(chip, T, d, G, I, 4)
    assert res["ub"] == (t["ubBytes"], t["concatUbBytes"])


@pytest.mark.parametrize("activation,act_param", [
    ("silu", 0.0), ("gelu", 0.0), ("gelu_tanh", 0.0), ("relu", 0.0), ("fatrelu", 0.05), ("drelu", 0.0),
    ("relu2", 0.0)])
def test_ffn_predict_q4_activations(emu, activation, act_param):
    x, q, scale, thresh, scores = make_q4(2, 128, 32, 256, 0.5, seed=8, activation=activation, act_param=act_param)
    res = emu.ffn_predict_q4(x, q, scale, thresh, activation=activation, act_param=act_param, chip="310B", cores=3)
    check_q4(res, x, q, scale, thresh, scores, activation, act_param)


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("cores", [1, 3, 8])
def test_ffn_predict_q4_cores_and_long_rows(emu, chip, cores):
    # d / G = 512 groups: WholeReduceSum runs in chunks of <= 255 repeats; 1 or several cores and neuron tiles
    x, q, scale, thresh, scores = make_q4(1, 8192, 16, 100, 0.5, seed=9, activation="gelu")
    res = emu.ffn_predict_q4(x, q, scale, thresh, activation="gelu", chip=chip, cores=cores)
    check_q4(res, x, q, scale, thresh, scores, "gelu", 0.0)


# ------------------------------------------------------------------------------------- delta
def empty_delta(H, D, Tmax, cap, dtype=torch.float16):
    return (torch.zeros(H, D), torch.zeros(H, cap, dtype=dtype), torch.zeros(H, cap, dtype=torch.uint8),
            torch.zeros(H, Tmax + 1, dtype=torch.int32))


def keys(T, H, D, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, H, D, generator=g) * 0.4).cumsum(0).to(dtype)


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("D", [64, 40])
@pytest.mark.parametrize("theta", [0.0, 0.3, 1.0, 100.0])
def test_delta_encode(emu, chip, D, theta):
    H, T, Tmax = 3, 70, 80
    k = keys(T, H, D)
    th = torch.tensor([theta, theta * 0.5, theta * 2])
    want = empty_delta(H, D, Tmax, Tmax * D)
    got = empty_delta(H, D, Tmax, Tmax * D)
    nnz1 = delta_encode_ref(k[:50], want[0], th, want[1], want[2], want[3], 0)
    nnz2 = delta_encode_ref(k[50:], want[0], th, want[1], want[2], want[3], 50)
    for lo, hi in ((0, 50), (50, T)):   # prefill chunk then decode-sized steps
        r = emu.delta_encode(k[lo:hi].contiguous(), got[0], th, got[1], got[2], got[3], lo, chip=chip, cores=2)
        assert r["status"][0] == 0
    assert torch.equal(got[3], want[3])
    n = int(want[3][:, T].max())
    assert torch.equal(got[1][:, :n], want[1][:, :n]) and torch.equal(got[2][:, :n], want[2][:, :n])
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    assert torch.equal((got[3][:, T] - got[3][:, 0]).long(), nnz1 + nnz2)


def test_delta_encode_capacity_overflow_is_reported(emu):
    H, D, T = 2, 64, 10
    k = keys(T, H, D)
    got = empty_delta(H, D, T, 100)   # far too small at theta = 0
    r = emu.delta_encode(k, got[0], torch.zeros(H), got[1], got[2], got[3], 0, chip="310B", cores=2)
    assert r["status"][0] == 1 and r["status"][3] == 100 and r["status"][2] > 100


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("H,Hq,D", [(2, 2, 64), (2, 8, 40), (1, 3, 128)])
@pytest.mark.parametrize("n_sink,window", [(4, 16), (0, 8), (2, 0)])
def test_delta_attention_decode(emu, chip, H, Hq, D, n_sink, window):
    T, Tmax = 90, 96
    k = keys(T, H, D, seed=5)
    ref, values, chan, offsets = empty_delta(H, D, Tmax, Tmax * D)
    delta_encode_ref(k, ref, torch.full((H,), 0.5), values, chan, offsets, 0)
    g = torch.Generator().manual_seed(6)
    v = torch.randn(H, Tmax, D, generator=g).half()
    for start in (0, 3, 17, T - 1):
        q = torch.randn(1, Hq, D, generator=g).half()
        sink = torch.zeros(H, max(n_sink, 1), D).half()
        ns = min(n_sink, start + 1)
        sink[:, :ns] = k[:ns].transpose(0, 1)
        win = torch.zeros(H, max(window, 1), D).half()
        for j in range(max(0, start - window), start):
            win[:, j % window] = k[j]
        want = delta_attention_ref(q, k[start:start + 1], v, values, chan, offsets, sink, win, start, n_sink,
                                   window, 1 / math.sqrt(D))
        got = emu.delta_attention(q, k[start:start + 1].contiguous(), v, values, chan, offsets, sink, win, start,
                                  n_sink, window, 1 / math.sqrt(D), chip=chip, cores=2)
        check_close(got["out"], want, torch.float16)
        _, t = emu.delta_attn_tiling(chip, H, Hq, D, start + 1, 2)
        assert got["ub"] == t["ubBytes"]
