"""Linear projections over GGUF-quantized weights, executed in their own blocks (no fp32 copy of the weights).

  qlinear(x [.., K], w [N, row_bytes] uint8, qtype, K) -> [.., N]      y = x W^T
    w      the raw block bytes of a weight [N, K], row-major (sparsedge/quant/formats.py has the layouts);
           row_bytes = K / block * type_size
    qtype  "q8_0" | "q4_0" | "q4_1" | "q4_k" | "q6_k" | "tq2_0" | "f16" | "bf16" | "f32"; K a multiple of its
           block
    x      float (fp32; bf16 / fp16 are upcast); y comes back in x's dtype
The composite reference dequantizes W to fp32 and multiplies in fp32: the definition of correct.
Fused kernels (llama.cpp's arithmetic) round x to int8 per block of 32 once per call
(quant.quantize_activations: d = amax / 127, q = round-half-even(x * 127 / amax)) and take integer dot
products against the weight blocks, so they differ from the reference by that rounding: per block b of x,
|x_e - d_b q_e| <= d_b / 2 = amax_b / 254, hence |y_fused - y_ref| <= sum_b (amax_b / 254) * sum_{e in b} |W_ne|
plus fp32 accumulation error (quant.int8_reference computes the rounded product exactly, in fp64).
The float formats (f32/f16/bf16) are not rounded: fp32 dot products of the widened rows. From 32 tokens on
(prefill) the CPU kernel widens chunks of rows and runs a GEMM: in fp32 (the reference's product, x not rounded),
or, where the build has AVX512-BF16, in bf16 with fp32 accumulation (x and the widened rows rounded to bf16 once,
inside the int8 bound above; bf16 rows with more than 8 tokens multiply the file's rows directly, |x| 2^-9 per
element: the parity bound adds 2^-8 sum |x||W| for them). SPARSEDGE_BF16_GEMM=0 keeps fp32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from sparsedge.ops.schema import Case, define
from sparsedge.quant import formats as qf


def check_qlinear(x: torch.Tensor, w: torch.Tensor, qtype: str, K: int) -> qf.QFormat:
    fmt = qf.get_format(qtype)
    qf.check_k(fmt, K)
    rb = fmt.row_bytes(K)
    if w.dim() != 2 or w.dtype != torch.uint8 or w.shape[1] != rb:
        raise ValueError(f"qlinear: w must be uint8 [N, {rb}] ({fmt.name} rows of K={K}), "
                         f"got {w.dtype} {list(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != K or not x.is_floating_point():
        raise ValueError(f"qlinear: x must be a float tensor [..., {K}], got {x.dtype} {list(x.shape)}")
    return fmt


def qlinear_ref(x, w, qtype: str, K: int):
    check_qlinear(x, w, qtype, K)
    W = qf.dequantize(w, qtype, K)
    y = x.reshape(-1, K).float() @ W.t()
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


def qlinear_fake(x, w, qtype: str, K: int):
    check_qlinear(x, w, qtype, K)
    return x.new_empty(*x.shape[:-1], w.shape[0])


define("qlinear(Tensor x, Tensor w, str qtype, int K) -> Tensor", qlinear_ref, qlinear_fake)


class QCase(NamedTuple):
    """One parity case: T tokens of x [T, K] against a qtype weight [N, K]."""
    qtype: str
    N: int
    K: int
    T: int
    dtype: torch.dtype = torch.float32


# parity cases: every format, decode (T = 1) and multi-token (T up to 8, and one prefill-sized batch),
# odd / tiny / tile-remainder N, the smallest K of each format and SmolLM2-135M's shapes
QCASES: list[QCase] = [
    *[QCase(q, N, K, T) for q in ("q8_0", "q4_0", "q4_1")
      for (N, K, T) in ((1, 32, 1), (3, 64, 2), (7, 96, 1), (33, 576, 1), (33, 576, 5), (64, 1536, 3),
                        (130, 576, 8), (17, 256, 7), (96, 128, 40))],
    *[QCase(q, N, K, T) for q in ("q4_k", "q6_k", "tq2_0")
      for (N, K, T) in ((1, 256, 1), (5, 512, 2), (33, 768, 1), (33, 768, 6), (66, 1536, 8), (17, 256, 3),
                        (96, 512, 40))],
    *[QCase(q, N, K, T) for q in ("f32", "f16", "bf16")
      for (N, K, T) in ((1, 1, 1), (9, 37, 3), (65, 576, 1), (9, 37, 12), (65, 576, 40))],
    QCase("q4_1", 31, 576, 2, torch.bfloat16),
    QCase("q8_0", 31, 576, 1, torch.bfloat16),
    QCase("q4_k", 9, 256, 3, torch.bfloat16),
    QCase("tq2_0", 9, 512, 2, torch.bfloat16),
]

# the same cases in the one op table (tests/test_ops.py runs them on every device; the NPU has no qlinear kernel)
CASES = [Case("qlinear", {"qtype": c.qtype, "N": c.N, "K": c.K, "T": c.T}, c.dtype, devices=("cpu", "cuda"))
         for c in QCASES]
