"""Sparse FFN ops (docs/methods.md §1): predictor + compaction, and the conditional FFN.

Layouts (the Session stores weights this way so every gather is a contiguous row read):
  x        [T, d]      FFN input (after the post-attention RMSNorm); T = tokens, each with its own active set
  p1       [r, d]      predictor down-projection;  p2 [I, r];  bias [I]   (any float dtype, math in fp32)
  w_gate   [I, d]      w_up [I, d]      w_down_t [I, d]  (W_down transposed)
  idx      [T, I] int32  active neuron ids in ascending order; only the first count[t] entries are valid
                         (the rest are unspecified: kernels must not read them)
  count    [T]    int32  predicted-active neurons per token
  down_count [T]  int32  active neurons whose h_i != 0 after the activation (rows of w_down_t accumulated)

Activation (string) and its parameters, with g = x.w_gate[i], u = x.w_up[i]:
  silu: h = silu(g) * u        gelu: gelu_erf(g) * u      gelu_tanh: gelu_tanh(g) * u
  relu: relu(g) * u            fatrelu: (g if g > act_param else 0) * u
  drelu: relu(g) * relu(u)     relu2: relu(g)^2 * u
  tau > 0 (CATS-style, for silu/gelu): h_i = 0 where |act(g_i)| < tau.
Gate/up dot products accumulate in fp32; y is returned in x's dtype.

4-bit gate x up predictor (`ffn_predict_q4`, for SiLU/GELU models where the gate alone is a poor guide):
  q        [I, 2, d/2] uint8   W_gate (q[:, 0]) and W_up (q[:, 1]) in 4 bits, symmetric per group of G
                               inputs: byte j of a group holds input j (low nibble) and j + G/2 (high
                               nibble), each stored as w/scale + 8 in [0, 15]
  scale    [I, 2, d/G] fp32    per-group scale (G = d / scale.shape[2], even)
  thresh   [I] fp32            neuron i is predicted active when |act(g^_i) * u^_i| > thresh_i
  x is quantized per group of G to int8 (xs = max|x_g| / 127, xq = round-half-even(x * inv) with inv the
  correctly rounded fp32 quotient 127 / max|x_g|),
  every group dot sum_k (q - 8) * xq is an exact integer, and g^ = fp32(sum over groups, in group order, in
  fp64, of dot_g * fp32(scale_g * xs_g)): every term is exact in fp64, so kernels agree to the last bit.
  The op returns the same (idx, count) as ffn_predict, for sparse_ffn_rows.
"""
from __future__ import annotations

import torch
from sparsedge.activations import ACTIVATIONS, activate
from sparsedge.ops.schema import FLOAT_DTYPES, Case, define, rows, sweep


def ffn_predict_ref(x, p1, p2, bias):
    scores = (x.float() @ p1.float().t()) @ p2.float().t() + bias.float()
    return compact_active(scores > 0)


def compact_active(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [T, I] -> (idx [T, I] int32 with each token's active ids first, ascending; count [T] int32)."""
    count = active.sum(-1).to(torch.int32)
    # stable sort puts active ids first, each group in ascending id order
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)
    return order.to(torch.int32), count


def sparse_ffn_rows_ref(x, idx, count, w_gate, w_up, w_down_t, activation: str, act_param: float, tau: float):
    T, d = x.shape
    y = torch.zeros(T, d, dtype=torch.float32, device=x.device)
    down_count = torch.zeros(T, dtype=torch.int32, device=x.device)
    for t in range(T):
        rows = idx[t, : int(count[t])].long()
        xt = x[t].float()
        g = w_gate.index_select(0, rows).float() @ xt
        u = w_up.index_select(0, rows).float() @ xt
        h = activate(g, u, activation, act_param, tau)
        down_count[t] = int((h != 0).sum())
        y[t] = h @ w_down_t.index_select(0, rows).float()
    return y.to(x.dtype), down_count


def sparse_ffn_ref(x, p1, p2, bias, w_gate, w_up, w_down_t, activation: str, act_param: float, tau: float):
    idx, count = ffn_predict_ref(x, p1, p2, bias)
    y, down_count = sparse_ffn_rows_ref(x, idx, count, w_gate, w_up, w_down_t, activation, act_param, tau)
    return y, count, down_count


def q4_estimates(x, q, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(g^, u^) [T, I] fp32: the 4-bit predictor's estimates of x.W_gate and x.W_up (see the header)."""
    T, d = x.shape
    I, ng = q.shape[0], scale.shape[2]
    G = d // ng
    xg = x.float().reshape(T, ng, G)
    amax = xg.abs().amax(-1)
    # one correctly rounded division (`127.0 / amax` would be torch's reciprocal-then-multiply, two roundings)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv[..., None])
    xs = amax / 127.0
    qq = q.reshape(I, 2, ng, G // 2)
    w = torch.cat([qq & 15, qq >> 4], -1).float() - 8.0  # [I, 2, ng, G]
    dots = torch.einsum("tgk,icgk->ticg", xq, w)  # exact integers in fp32 (|dot| <= 8 * 127 * G < 2^24)
    c = scale.float()[None] * xs[:, None, None, :]  # [T, I, 2, ng]
    est = torch.zeros(T, I, 2, dtype=torch.float64, device=x.device)
    for g in range(ng):  # group order, as the kernels accumulate
        est = est + dots[..., g].double() * c[..., g].double()
    est = est.float()
    return est[..., 0], est[..., 1]


def q4_scores(x, q, scale, activation: str, act_param: float) -> torch.Tensor:
    """|act(g^) * u^| [T, I]: what ffn_predict_q4 compares with its per-neuron thresholds."""
    g, u = q4_estimates(x, q, scale)
    return activate(g, u, activation, act_param, 0.0).abs()


def ffn_predict_q4_ref(x, q, scale, thresh, activation: str, act_param: float):
    return compact_active(q4_scores(x, q, scale, activation, act_param) > thresh.float())


def _predict_fake(x, p1, p2, bias):
    T, I = x.shape[0], p2.shape[0]
    return x.new_empty(T, I, dtype=torch.int32), x.new_empty(T, dtype=torch.int32)


def _predict_q4_fake(x, q, scale, thresh, activation, act_param):
    T, I = x.shape[0], q.shape[0]
    return x.new_empty(T, I, dtype=torch.int32), x.new_empty(T, dtype=torch.int32)


def _rows_fake(x, idx, count, w_gate, w_up, w_down_t, activation, act_param, tau):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.int32)


def _fused_fake(x, p1, p2, bias, w_gate, w_up, w_down_t, activation, act_param, tau):
    T = x.shape[0]
    return torch.empty_like(x), x.new_empty(T, dtype=torch.int32), x.new_empty(T, dtype=torch.int32)


define("ffn_predict(Tensor x, Tensor p1, Tensor p2, Tensor bias) -> (Tensor idx, Tensor count)",
       ffn_predict_ref, _predict_fake)
define("ffn_predict_q4(Tensor x, Tensor q, Tensor scale, Tensor thresh, str activation, float act_param) "
       "-> (Tensor idx, Tensor count)", ffn_predict_q4_ref, _predict_q4_fake)
define("sparse_ffn_rows(Tensor x, Tensor idx, Tensor count, Tensor w_gate, Tensor w_up, Tensor w_down_t, "
       "str activation, float act_param, float tau) -> (Tensor y, Tensor down_count)",
       sparse_ffn_rows_ref, _rows_fake)
define("sparse_ffn(Tensor x, Tensor p1, Tensor p2, Tensor bias, Tensor w_gate, Tensor w_up, Tensor w_down_t, "
       "str activation, float act_param, float tau) -> (Tensor y, Tensor count, Tensor down_count)",
       sparse_ffn_ref, _fused_fake)


# ------------------------------------------------------------------------------------------------ parity cases
# tests/test_ops.py runs each on every device against the reference; sparsedge.testing.opcases builds the inputs.
# density: share of neurons active (0 and 1 exactly); bias_std instead: a random per-neuron predictor bias.
_F16 = (torch.float16,)
_SHAPES = rows("d I r", (576, 1536, 32), (4096, 11008, 256), (200, 300, 24))  # SmolLM2, Llama-2-7B, unaligned odd
_DENSITIES = [0.0, 0.05, 0.5, 1.0]
_ACTS = rows("act act_param tau", *[(a, 0.0, 0.0) for a in ACTIVATIONS], ("fatrelu", 0.05, 0.0), ("silu", 0.0, 0.05),
             ("gelu", 0.0, 0.02))
_ACTS_TAU = rows("act act_param tau", ("silu", 0.0, 0.0), ("silu", 0.0, 0.15), ("gelu", 0.0, 0.1),
                 ("gelu_tanh", 0.0, 0.0), ("relu", 0.0, 0.0), ("fatrelu", 0.1, 0.0), ("drelu", 0.0, 0.0),
                 ("relu2", 0.0, 0.0))
_ACTS_NPU = rows("act act_param tau", ("silu", 0.0, 0.0), ("silu", 0.0, 0.05), ("gelu", 0.0, 0.0),
                 ("gelu_tanh", 0.0, 0.03), ("relu", 0.0, 0.0), ("fatrelu", 0.1, 0.0), ("drelu", 0.0, 0.0),
                 ("relu2", 0.0, 0.0))


def _big(p):  # Llama-7B rows beyond one decode token: the reference alone takes seconds
    return p["d"] >= 4096 and (p["T"] > 1 or p["dtype"] == torch.bfloat16)


CASES = [
    # ffn_predict: shapes x densities x T; a d=64 layer from empty to full; random biases on 1, 3 and 8 cores
    *sweep("ffn_predict", FLOAT_DTYPES, _big, T=[1, 3, 8], shape=_SHAPES, density=_DENSITIES),
    *sweep("ffn_predict", (torch.float32, torch.bfloat16), at=rows("T d I r", (5, 64, 520, 16)),
           density=[0.0, 0.1, 0.5, 0.9, 1.0], bias=["fp32"]),
    *sweep("ffn_predict", _F16, at=rows("T d I r", (3, 96, 700, 24)), bias_std=[0.5], cores=[1, 3, 8]),
    # sparse_ffn_rows: every activation (with tau / act_param), shapes x densities, a d=64 layer, 3 NPU cores
    *sweep("sparse_ffn_rows", FLOAT_DTYPES, T=[1, 2, 8], at=rows("d I density", (576, 1536, 0.3)), act=_ACTS),
    *sweep("sparse_ffn_rows", FLOAT_DTYPES, lambda p: p["d"] >= 4096,  # 3 x 45M random weights per case: -m slow
           T=[1, 4, 8], shape=rows("d I", (576, 1536), (4096, 11008), (200, 300)), density=_DENSITIES, act=["relu"]),
    *sweep("sparse_ffn_rows", (torch.float32, torch.bfloat16), at=rows("T d I", (5, 64, 520)),
           density=[0.0, 0.1, 0.5, 0.9, 1.0], act=["relu"]),
    *sweep("sparse_ffn_rows", _F16, at=rows("T d I", (2, 200, 400)), density=_DENSITIES,
           act=rows("act tau", ("silu", 0.02)), cores=[3]),
    Case("sparse_ffn_rows", dict(T=1, d=16, I=32, act="relu", bad="index"), raises="out of range", devices=("cpu",)),
    Case("sparse_ffn_rows", dict(T=1, d=16, I=32, act="tanh"), raises="unknown FFN activation 'tanh'",
         devices=("cpu", "cuda")),
    Case("sparse_ffn_rows", dict(T=1, d=64, I=128, act="swish"), raises="activation", devices=("cpu", "cuda")),
    # sparse_ffn (predictor + rows, fused): activations; shapes x densities; tokens, rows and widths off every
    # SIMD/tile multiple (also checked thread- and batch-independent on CPU); fp32 predictors with bf16 weights
    *sweep("sparse_ffn", FLOAT_DTYPES, at=rows("T d I r", (3, 72, 300, 20)), density=[0.5], act=_ACTS_TAU),
    *sweep("sparse_ffn", (torch.float32,), T=[1, 2, 7], at=rows("d I", (8, 16), (576, 1536), (130, 1000)), r=[8],
           density=[0.3], act=rows("act tau", ("silu", 0.05)), invariance=[True]),
    Case("sparse_ffn", dict(T=2, d=32, I=64, r=8, density=0.5, act="relu", predictor="fp32"), torch.bfloat16,
         devices=("cpu", "cuda")),
    *sweep("sparse_ffn", FLOAT_DTYPES, T=[1, 8], shape=rows("d I r", (576, 1536, 32), (200, 300, 24)),
           density=_DENSITIES, act=["drelu"]),
    *sweep("sparse_ffn", _F16, at=rows("T d r I", (1, 576, 32, 1536), (3, 72, 20, 300)), density=_DENSITIES,
           act=["relu"], cores=[4]),
    *sweep("sparse_ffn", _F16, at=rows("T d r I", (2, 64, 16, 256)), density=[0.5], act=_ACTS_NPU, cores=[3]),
    Case("sparse_ffn", dict(T=2, d=128, r=16, I=512, bias_std=0.2, act="silu", cores=5), torch.bfloat16),
    Case("sparse_ffn", dict(T=1, d=4096, I=11008, r=256, density=0.1, act="relu"), torch.float16, slow=True),
    # ffn_predict_q4: group sizes 16..2048 (96: not a power of two), rows off 32 / 128, activations, thresholds
    # keeping none / half / all, 1..8 NPU cores, and 512 groups per row (d = 8192)
    *sweep("ffn_predict_q4", FLOAT_DTYPES, T=[1, 3], at=rows("d I G", (576, 1536, 32), (576, 1536, 64),
           (4096, 1024, 128), (384, 300, 128), (160, 77, 32), (576, 256, 96)), act=["silu", "gelu", "relu", "drelu"],
           density=[0.5, 1.0, 0.0]),
    *sweep("ffn_predict_q4", FLOAT_DTYPES, T=[1, 3], at=rows("d I G", (4096, 64, 2048)),
           act=["silu", "gelu", "relu", "drelu"], density=[0.5, 1.0, 0.0], devices=("cpu", "cuda")),  # NPU: G <= 128
    *sweep("ffn_predict_q4", (torch.float16, torch.bfloat16), at=rows("T d G I", (1, 256, 64, 700), (3, 96, 32, 300),
           (2, 160, 16, 130), (2, 512, 128, 200)), density=[0.0, 0.5, 1.0], act=["silu"], cores=[4]),
    *sweep("ffn_predict_q4", _F16, at=rows("T d G I", (2, 128, 32, 256)), density=[0.5],
           act=rows("act act_param", ("silu", 0.0), ("gelu", 0.0), ("gelu_tanh", 0.0), ("relu", 0.0),
                    ("fatrelu", 0.05), ("drelu", 0.0), ("relu2", 0.0)), cores=[3]),
    *sweep("ffn_predict_q4", _F16, at=rows("T d G I", (1, 8192, 16, 100)), density=[0.5], act=["gelu"],
           cores=[1, 3, 8]),
    *[Case("ffn_predict_q4", dict(T=2, d=160, G=32, I=77, act=act, density=0.5, bad=bad), raises=msg,
           devices=("cpu", "cuda"))
      for bad, act, msg in [("q_dtype", "silu", "q must be uint8"), ("scale_shape", "silu", "scale must be"),
                            ("thresh_shape", "silu", "thresh must be"), (None, "swish", "activation")]],
]
