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
from sparsedge.activations import activate
from sparsedge.ops.schema import define



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
