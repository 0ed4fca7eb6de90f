"""BitNet b1.58's BitLinear over 2-bit packed ternary weights (transformers' `BitLinear`, and `AutoBitLinear`, whose
arithmetic is the same up to fp32 rounding), executed in the packing: weight bytes per token are K N / 4, 8x fewer
than fp16.

  bitlinear(x [.., K], w [N/4, K] uint8, scale [N] fp32) -> [.., N]
    w      byte (g, k) holds W[4g + i, k] + 1 in bits 2i..2i+1 (i = 0..3), W in {-1, 0, +1}: four consecutive
           output rows per byte row, so projections concatenate by rows (q/k/v, gate/up) as byte rows. transformers'
           checkpoints pack rows r, r + N/4, r + N/2, r + 3N/4 into byte row r instead; sparsedge.quant.ternary
           converts at load (TernaryWeight). A code 3 is never written (it would read as +2).
    scale  BitLinear's weight_scale of the projection each output row belongs to (its divisor: W_float ~ W / scale;
           AutoBitLinear's multiplier m is stored as 1 / m)
    x      float (fp32, bf16, fp16; computed in fp32); y comes back in x's dtype
  Per token t, with fp32 IEEE ops in this order (transformers' activation_quant and post_quant_process in fp32):
    s_t = (1 / max(max_k |x_tk|, 1e-5)) * 127     (two roundings: how torch evaluates transformers' `127 / amax`)
    q_tk = clamp(round_half_even(x_tk * s_t), -128, 127)
    y_tn = float(sum_k W_nk q_tk) / (scale_n * s_t)
The integer sums are exact (int32 on the kernels, fp64 in the reference), so every kernel equals the composite
reference bit for bit: the only roundings are the fp32 ops above and the cast of the int sum, and the reference
equals transformers' BitLinear (fp32) bit for bit (tests/test_bitnet.py).
"""
from __future__ import annotations

import torch

from sparsedge.ops.schema import FLOAT_DTYPES, Case, define, rows, sweep
from sparsedge.quant.ternary import unpack


def check_bitlinear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> None:
    if w.dim() != 2 or w.dtype != torch.uint8 or w.shape[1] == 0:
        raise ValueError(f"bitlinear: w must be uint8 [N/4, K] (4 ternary rows per byte row), got {w.dtype} "
                         f"{list(w.shape)}")
    K, N = w.shape[1], 4 * w.shape[0]
    if x.dim() < 1 or x.shape[-1] != K or not x.is_floating_point():
        raise ValueError(f"bitlinear: x must be a float tensor [..., K={K}], got {x.dtype} {list(x.shape)}")
    if scale.dim() != 1 or scale.shape[0] != N or scale.dtype != torch.float32:
        raise ValueError(f"bitlinear: scale must be float32 [N={N}] (one per output row), got {scale.dtype} "
                         f"{list(scale.shape)}")


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (q fp32 [T, K] holding int8 values, s fp32 [T, 1]): BitLinear's per-token absmax rounding."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-5).reciprocal() * 127  # what `127 / t` is in torch
    return (xf * s).round().clamp(-128, 127), s


def bitlinear_ref(x, w, scale):
    check_bitlinear(x, w, scale)
    K = w.shape[1]
    q, s = quantize_tokens(x.reshape(-1, K))
    acc = (q.double() @ unpack(w).double().t()).float()  # exact integers (fp64), one rounding to fp32
    y = acc / (scale * s)
    return y.reshape(*x.shape[:-1], 4 * w.shape[0]).to(x.dtype)


def bitlinear_fake(x, w, scale):
    check_bitlinear(x, w, scale)
    return x.new_empty(*x.shape[:-1], 4 * w.shape[0])


define("bitlinear(Tensor x, Tensor w, Tensor scale) -> Tensor", bitlinear_ref, bitlinear_fake)

# parity cases (tests/test_ops.py): decode (T = 1) and prefill (T > 1, chunk and token-pair remainders), K below,
# at and past the 32-column SIMD step (a row tail), N = 4 (one byte row) and odd byte-row counts (a pair remainder),
# BitNet-b1.58-2B's K; an all-zero token (amax clamped to 1e-5), and thread counts. The NPU has no bitlinear kernel.
_DEV = ("cpu", "cuda")
CASES = [
    *sweep("bitlinear", FLOAT_DTYPES, devices=_DEV,
           at=rows("T K N", (1, 64, 64), (1, 37, 12), (1, 1, 4), (2, 5, 4), (3, 96, 20), (7, 33, 36), (1, 2560, 644),
                   (5, 2560, 132), (33, 160, 68), (40, 256, 132))),
    *sweep("bitlinear", (torch.float32,), devices=_DEV, at=rows("T K N", (3, 200, 76)), zero_token=[True]),
    *sweep("bitlinear", (torch.float32,), devices=_DEV, at=rows("T K N", (1, 1024, 1028), (9, 512, 260)),
           cores=[1, 3]),
    *[Case("bitlinear", dict(T=2, K=64, N=16, bad=bad), raises=msg, devices=_DEV)
      for bad, msg in [("w_dtype", "w must be uint8"), ("w_dim", "w must be uint8"),
                       ("w_k", "x must be a float tensor \\[\\.\\.\\., K=65\\]"),
                       ("scale_len", "scale must be float32 \\[N=16\\]"), ("scale_dtype", "scale must be float32"),
                       ("x_dtype", "x must be a float tensor")]],
]
