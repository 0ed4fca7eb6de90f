"""TEST HARNESS (run in a subprocess by tests/test_ascend_dispatch.py): load the fake-NPU build of the binding,
call each op's PrivateUse1 kernel on CPU tensors, and print a JSON report: launch log, OpCommand names, and the
max error against the composite reference. A subprocess keeps the PrivateUse1 registrations out of the test run."""
from __future__ import annotations

import ctypes
import json
import math
import sys
import warnings

import torch

import sparsedge.ops as ops
from sparsedge.ops.delta import delta_attention_ref, delta_encode_ref
from sparsedge.ops.ffn import ffn_predict_q4_ref, ffn_predict_ref, q4_scores, sparse_ffn_ref, sparse_ffn_rows_ref
from sparsedge.ops.qffn import qsparse_ffn_rows_ref
from sparsedge.quant import formats as qf
from sparsedge.quant.down_t import DownT
from sparsedge.quant.qweight import QWeight

lib_path = sys.argv[1]
torch.ops.load_library(lib_path)
lib = ctypes.CDLL(lib_path)
lib.sd_emu_launch_log.restype = ctypes.c_char_p
lib.sparsedge_fake_opcommand_log.restype = ctypes.c_char_p
lib.sparsedge_ascend_build_info.restype = ctypes.c_char_p
KS = torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1)
report = {"registered": {n: ops.has_fused(n, "npu") for n in ops.op_names()},
          "build_info": lib.sparsedge_ascend_build_info().decode(), "cases": {}}


def call(name, *args):
    lib.sd_emu_clear_log()
    lib.sparsedge_fake_opcommand_clear()
    out = getattr(torch.ops.sparsedge, name).default.redispatch(KS, *args)
    return out, lib.sd_emu_launch_log().decode().splitlines(), lib.sparsedge_fake_opcommand_log().decode().split()


def err(a, b):
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def ptr(t):
    return hex(t.data_ptr())


g = torch.Generator().manual_seed(0)
T, d, r, I = 2, 72, 20, 300
x = torch.randn(T, d, generator=g).half()
p1 = (torch.randn(r, d, generator=g) / 8).half()
p2 = (torch.randn(I, r, generator=g) / 4).half()
bias = torch.randn(I, generator=g) * 0.3
wg, wu = [(torch.randn(I, d, generator=g) / 8).half() for _ in range(2)]
wd = (torch.randn(I, d, generator=g) / 12).half()

(y, c, dc), log, cmds = call("sparse_ffn", x, p1, p2, bias, wg, wu, wd, "gelu", 0.0, 0.0)
yr, cr, dcr = sparse_ffn_ref(x, p1, p2, bias, wg, wu, wd, "gelu", 0.0, 0.0)
report["cases"]["sparse_ffn"] = {
    "log": log, "cmds": cmds, "err": err(y, yr), "count_ok": bool(torch.equal(c, cr) and torch.equal(dc, dcr)),
    "ptrs": {"x": ptr(x), "p1": ptr(p1), "p2": ptr(p2), "bias": ptr(bias), "w_gate": ptr(wg), "w_up": ptr(wu),
             "w_down_t": ptr(wd), "y": ptr(y), "count": ptr(c), "down_count": ptr(dc)}}

(idx, cnt), log, cmds = call("ffn_predict", x, p1, p2, bias)
idr, cnr = ffn_predict_ref(x, p1, p2, bias)
report["cases"]["ffn_predict"] = {
    "log": log, "cmds": cmds, "ok": bool(torch.equal(cnt, cnr) and all(
        torch.equal(idx[t, : cnr[t]], idr[t, : cnr[t]]) for t in range(T))),
    "ptrs": {"idx": ptr(idx), "count": ptr(cnt)}}

(y2, dc2), log, cmds = call("sparse_ffn_rows", x, idr, cnr, wg, wu, wd, "fatrelu", 0.05, 0.0)
y2r, dc2r = sparse_ffn_rows_ref(x, idr, cnr, wg, wu, wd, "fatrelu", 0.05, 0.0)
report["cases"]["sparse_ffn_rows"] = {"log": log, "cmds": cmds, "err": err(y2, y2r), "count_ok": bool(torch.equal(dc2, dc2r)),
                                      "ptrs": {"idx": ptr(idr), "count": ptr(cnr)}}
try:  # the binding parses activation names through backends/include/sparsedge/activations.h
    call("sparse_ffn_rows", x, idr, cnr, wg, wu, wd, "swish", 0.0, 0.0)
    report["cases"]["bad_activation"] = "no error"
except (RuntimeError, ValueError) as e:
    report["cases"]["bad_activation"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"

G4 = 32
q4 = torch.randint(0, 256, (I, 2, 64 // 2), dtype=torch.uint8, generator=g)
s4 = torch.rand(I, 2, 64 // G4, generator=g) * 0.05
x4 = x[:, :64].contiguous()
th4 = q4_scores(x4, q4, s4, "gelu", 0.0).mean(0)   # between the two tokens' scores: away from the boundary
(idx4, cnt4), log, cmds = call("ffn_predict_q4", x4, q4, s4, th4, "gelu", 0.0)
idr4, cnr4 = ffn_predict_q4_ref(x4, q4, s4, th4, "gelu", 0.0)
report["cases"]["ffn_predict_q4"] = {
    "log": log, "cmds": cmds, "ok": bool(torch.equal(cnt4, cnr4) and all(
        torch.equal(idx4[t, : cnr4[t]], idr4[t, : cnr4[t]]) for t in range(T))),
    "ptrs": {"x": ptr(x4), "q": ptr(q4), "scale": ptr(s4), "thresh": ptr(th4), "idx": ptr(idx4), "count": ptr(cnt4)}}

# qsparse_ffn_rows: the W8 kernel (q8_0 gate/up, q8_0 W_down), and the composite fallback for other formats
dq, Iq = 64, 160
wq = {f: qf.quantize(torch.randn(2 * Iq, dq, generator=g) / 8, f) for f in ("q8_0", "q4_1")}
dn = {f: DownT.from_qweight(QWeight(qf.quantize(torch.randn(dq, Iq, generator=g) / 12, f), f, Iq)) for f in ("q8_0", "q4_1")}
xq = x[:, :dq].contiguous()
iq = torch.zeros(T, Iq, dtype=torch.int32)
cq = torch.tensor([37, 0], dtype=torch.int32)  # 37 neurons for token 0, none for token 1
iq[0, :37] = torch.randperm(Iq, generator=g)[:37].sort().values.int()
for f in ("q8_0", "q4_1"):
    args = (xq, iq, cq, wq[f], f, *dn[f].tensors(), "relu2", 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (yq, dcq), log, cmds = call("qsparse_ffn_rows", *args)
    yqr, dcqr = qsparse_ffn_rows_ref(*args)
    report["cases"][f"qsparse_ffn_rows_{f}"] = {
        "log": log, "cmds": cmds, "err": err(yq, yqr), "scale": float(yqr.float().abs().max()),
        "count_ok": bool(torch.equal(dcq, dcqr)), "dtype_ok": yq.dtype == xq.dtype,
        "warnings": [str(w.message) for w in caught],
        "ptrs": {"x": ptr(xq), "idx": ptr(iq), "count": ptr(cq), "w": ptr(wq[f]), "codes": ptr(dn[f].codes),
                 "scale": ptr(dn[f].scale), "down_count": ptr(dcq)}}

H, Hq, D, Tmax = 2, 4, 64, 40
k = (torch.randn(Tmax, H, D, generator=g) * 0.4).cumsum(0).half()
theta = torch.tensor([0.3, 0.6])
bufs = [torch.zeros(H, D), torch.zeros(H, Tmax * D, dtype=torch.half), torch.zeros(H, Tmax * D, dtype=torch.uint8),
        torch.zeros(H, Tmax + 1, dtype=torch.int32)]
want = [b.clone() for b in bufs]
nnz, log, cmds = call("delta_encode", k[:30], *bufs[:1], theta, *bufs[1:], 0)
nnz_r = delta_encode_ref(k[:30], want[0], theta, want[1], want[2], want[3], 0)
report["cases"]["delta_encode"] = {
    "log": log, "cmds": cmds, "ok": bool(torch.equal(nnz, nnz_r) and torch.equal(bufs[3], want[3]) and
                                         torch.equal(bufs[1], want[1]) and torch.equal(bufs[2], want[2]) and
                                         torch.equal(bufs[0], want[0])),
    "ptrs": {"ref": ptr(bufs[0]), "values": ptr(bufs[1]), "chan": ptr(bufs[2]), "offsets": ptr(bufs[3])}}
try:
    call("delta_encode", k[:30], torch.zeros(H, D), torch.zeros(H), torch.zeros(H, 10, dtype=torch.half),
         torch.zeros(H, 10, dtype=torch.uint8), torch.zeros(H, Tmax + 1, dtype=torch.int32), 0)
    report["cases"]["overflow"] = "no error"
except RuntimeError as e:
    report["cases"]["overflow"] = str(e).splitlines()[0]

delta_encode_ref(k[30:], want[0], theta, want[1], want[2], want[3], 30)
v = torch.randn(H, Tmax, D, generator=g).half()
n_sink, window = 2, 8
for start, T2 in ((29, 1), (20, 5)):
    q = torch.randn(T2, Hq, D, generator=g).half()
    sink = k[:n_sink].transpose(0, 1).contiguous()
    win = torch.zeros(H, window, D).half()
    for j in range(max(0, start - window), start):
        win[:, j % window] = k[j]
    args = (q, k[start:start + T2].contiguous(), v, want[1], want[2], want[3], sink, win, start, n_sink, window,
            1 / math.sqrt(D))
    out, log, cmds = call("delta_attention", *args)
    report["cases"][f"delta_attention_T{T2}"] = {"log": log, "cmds": cmds, "err": err(out, delta_attention_ref(*args)),
                                                 "ptrs": {"q": ptr(q), "v_cache": ptr(v), "out": ptr(out)}}
print(json.dumps(report))
