"""One FFN step over block-quantized weights that skips the down rows of neurons whose exact |h| is small.

  qsparse_ffn(x [T, d], w_gate_up [2I, row_bytes] uint8, qtype, down_codes, down_scale, down_min,
              thresh [I] fp32, activation, act_param) -> (y [T, d] in x's dtype, count [T] int32)

    w_gate_up   gate rows then up rows, raw GGUF blocks of K = d (qtype: q8_0 | q4_0 | q4_1 | q4_k | q6_k)
    down_*      W_down in the neuron-row layout of sparsedge.quant.down_t (exactly the file's values)
    thresh      neuron i's down row runs for token t when |h_ti| > thresh_i (a negative threshold keeps all)
    count       down rows run per token

Per token: g, u = W_gate x, W_up x (x rounded to int8 blocks, as sparsedge::qlinear does); h = act(g) * u; keep
the neurons above threshold; y = W_down h_kept, with h_kept rounded to int8 per block of 32 neurons (the blocks of
W_down, as qlinear rounds its input), so that with every neuron kept this is the dense quantized FFN's arithmetic.
Gate and up stay dense: on a SiLU/GELU model no cheaper signal picks the neurons well (docs/results/ffn.md §3b:
the exact gate alone costs +15.7% perplexity at 40% skipped, the exact |h| +1.5%), and once the weights are 4-bit
a predictor costs as many bytes as the rows it saves. The down third is what exact |h| makes free to skip.

The composite reference: x rounded as the kernels round it (quant.quantize_activations), gate/up and the
down product in float64 from the dequantized weights, h_kept rounded the same way; fused kernels differ from
it by fp32 accumulation, and by one int8 step of h where fp32 h lies on a rounding boundary.

NPU (ascendc_ops/kernels/qffn.cpp): qsparse_ffn_rows with q8_0 gate/up and a q8_0 W_down only, with the same arithmetic
(x and h rounded to int8 as above, exact integer block dots, fp32 sums); other formats run this composite reference
from the binding, with a warning. qsparse_ffn has no NPU kernel.
"""
from __future__ import annotations

import torch

from sparsedge.activations import activate, check_activation
from sparsedge.ops.schema import Case, define
from sparsedge.quant import formats as qf

GATE_UP_FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")


def check_qsparse_ffn(x, w_gate_up, qtype, codes, scale, minv, thresh, activation) -> tuple[int, int]:
    check_activation(activation)
    if qtype not in GATE_UP_FORMATS:
        raise ValueError(f"qsparse_ffn: gate/up format {qtype!r} is not block-quantized "
                         f"(supported: {', '.join(GATE_UP_FORMATS)})")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"qsparse_ffn: x must be a float [T, d] tensor, got {x.dtype} {list(x.shape)}")
    d = x.shape[1]
    fmt = qf.get_format(qtype)
    qf.check_k(fmt, d)
    I = thresh.numel()
    if thresh.dim() != 1 or thresh.dtype != torch.float32 or I % qf.QK or I == 0:
        raise ValueError(f"qsparse_ffn: thresh must be float32 [I] with I a positive multiple of {qf.QK}, "
                         f"got {thresh.dtype} {list(thresh.shape)}")
    if w_gate_up.dtype != torch.uint8 or tuple(w_gate_up.shape) != (2 * I, fmt.row_bytes(d)):
        raise ValueError(f"qsparse_ffn: w_gate_up must be uint8 [{2 * I}, {fmt.row_bytes(d)}] ({qtype} gate and up "
                         f"rows of K={d}), got {w_gate_up.dtype} {list(w_gate_up.shape)}")
    four_bit = codes.dtype == torch.uint8
    if not ((four_bit and tuple(codes.shape) == (I, d // 2)) or (codes.dtype == torch.int8 and tuple(codes.shape) == (I, d))):
        raise ValueError(f"qsparse_ffn: down codes must be uint8 [{I}, {d // 2}] (4-bit) or int8 [{I}, {d}], got "
                         f"{codes.dtype} {list(codes.shape)}")
    if scale.dtype != torch.float16 or tuple(scale.shape) != (I // qf.QK, d):
        raise ValueError(f"qsparse_ffn: down scale must be float16 [{I // qf.QK}, {d}], got {scale.dtype} "
                         f"{list(scale.shape)}")
    if minv.numel() and (minv.dtype != torch.float16 or tuple(minv.shape) != (I // qf.QK, d)):
        raise ValueError(f"qsparse_ffn: down min must be empty or float16 [{I // qf.QK}, {d}], got {minv.dtype} "
                         f"{list(minv.shape)}")
    if four_bit and not minv.numel():
        raise ValueError("qsparse_ffn: 4-bit down codes need their mins (q4_1's m, q4_0's -8 d)")
    return d, I


def round_blocks(v: torch.Tensor) -> torch.Tensor:
    """float64 values of v [T, K] after the kernels' int8 rounding per block of 32."""
    q, dq, _ = qf.quantize_activations(v.float())
    T, K = v.shape
    return (q.double().reshape(T, K // qf.QK, qf.QK) * dq.double()[..., None]).reshape(T, K)


def down_weights_t(codes, scale, minv) -> torch.Tensor:
    """W_downᵀ [I, d] float64 from the neuron-row layout."""
    from sparsedge.quant.down_t import unpack_nibbles
    q = (unpack_nibbles(codes) if codes.dtype == torch.uint8 else codes).double()
    w = scale.double().repeat_interleave(qf.QK, 0) * q
    return w + minv.double().repeat_interleave(qf.QK, 0) if minv.numel() else w


def hidden_ref(x, w_gate_up, qtype, I, activation, act_param) -> torch.Tensor:
    """h [T, I] float64 as the kernels compute it (x rounded to int8 blocks)."""
    gu = qf.int8_reference(x.float(), w_gate_up, qtype, x.shape[1])
    return activate(gu[:, :I], gu[:, I:], activation, act_param, 0.0)


def qsparse_ffn_ref(x, w_gate_up, qtype: str, codes, scale, minv, thresh, activation: str, act_param: float):
    d, I = check_qsparse_ffn(x, w_gate_up, qtype, codes, scale, minv, thresh, activation)
    h = hidden_ref(x, w_gate_up, qtype, I, activation, act_param)
    keep = h.abs() > thresh.double()
    hk = round_blocks(torch.where(keep, h, torch.zeros_like(h)))
    y = hk @ down_weights_t(codes, scale, minv)
    return y.to(x.dtype), keep.sum(1, dtype=torch.int32)


def qsparse_ffn_fake(x, w_gate_up, qtype: str, codes, scale, minv, thresh, activation: str, act_param: float):
    check_qsparse_ffn(x, w_gate_up, qtype, codes, scale, minv, thresh, activation)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=torch.int32)


define("qsparse_ffn(Tensor x, Tensor w_gate_up, str qtype, Tensor down_codes, Tensor down_scale, Tensor down_min, "
       "Tensor thresh, str activation, float act_param) -> (Tensor, Tensor)", qsparse_ffn_ref, qsparse_ffn_fake)


# qsparse_ffn_rows(x, idx [T, I] int32, count [T] int32, w_gate_up, qtype, down_*, activation, act_param)
#   -> (y, down_count): the neurons listed for each token (idx[t, :count[t]], ascending: sparsedge::ffn_predict's
# output) have their gate/up rows read; every other h is 0; down rows run for every nonzero h (a relu-family
# neuron predicted active whose h is exactly 0 costs no down row). Arithmetic as qsparse_ffn.
def check_rows(x, idx, count, w_gate_up, qtype, codes, scale, minv, activation) -> tuple[int, int]:
    I = codes.shape[0]
    d, _ = check_qsparse_ffn(x, w_gate_up, qtype, codes, scale, minv, torch.zeros(I), activation)
    T = x.shape[0]
    if idx.dtype != torch.int32 or tuple(idx.shape) != (T, I) or count.dtype != torch.int32 or count.numel() != T:
        raise ValueError(f"qsparse_ffn_rows: idx must be int32 [{T}, {I}] and count int32 [{T}] (ffn_predict's "
                         f"output), got {idx.dtype} {list(idx.shape)} and {count.dtype} {list(count.shape)}")
    return d, I


def listed(idx, count, I: int) -> torch.Tensor:
    """bool [T, I]: the neurons idx[t, :count[t]] of each token."""
    T = idx.shape[0]
    mask = torch.zeros(T, I, dtype=torch.bool, device=idx.device)
    for t in range(T):
        mask[t, idx[t, : int(count[t])].long()] = True
    return mask


def qsparse_ffn_rows_ref(x, idx, count, w_gate_up, qtype: str, codes, scale, minv, activation: str, act_param: float):
    d, I = check_rows(x, idx, count, w_gate_up, qtype, codes, scale, minv, activation)
    h = hidden_ref(x, w_gate_up, qtype, I, activation, act_param)
    h = torch.where(listed(idx, count, I), h, torch.zeros_like(h))
    y = round_blocks(h) @ down_weights_t(codes, scale, minv)
    return y.to(x.dtype), (h != 0).sum(1, dtype=torch.int32)


def qsparse_ffn_rows_fake(x, idx, count, w_gate_up, qtype: str, codes, scale, minv, activation: str, act_param: float):
    check_rows(x, idx, count, w_gate_up, qtype, codes, scale, minv, activation)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=torch.int32)


define("qsparse_ffn_rows(Tensor x, Tensor idx, Tensor count, Tensor w_gate_up, str qtype, Tensor down_codes, "
       "Tensor down_scale, Tensor down_min, str activation, float act_param) -> (Tensor, Tensor)",
       qsparse_ffn_rows_ref, qsparse_ffn_rows_fake)


# parity cases: every gate/up format with every down format, decode (T = 1) and a few tokens, kept fractions from
# none to all, SmolLM2's shape, the activations of the SiLU/GELU and relu families; the NPU has no kernel
def _case(gu, down, d, I, T, keep, act="silu", dtype=torch.float32):
    return Case("qsparse_ffn", {"qtype": gu, "down": down, "d": d, "I": I, "T": T, "keep": keep, "act": act}, dtype,
                devices=("cpu", "cuda"))


CASES = [
    *[_case(gu, down, 256, 64, 1, 0.5) for gu in GATE_UP_FORMATS for down in ("q4_0", "q4_1", "q8_0")],
    *[_case("q4_1", "q4_1", 64, 96, T, keep) for T in (1, 3) for keep in (0.0, 0.1, 0.6, 1.0)],
    *[_case("q8_0", "q8_0", 96, 64, 2, 0.4, act) for act in ("gelu_tanh", "relu", "relu2", "drelu", "fatrelu")],
    _case("q4_1", "q4_1", 576, 1536, 1, 0.4),
    _case("q4_1", "q4_1", 576, 1536, 4, 0.4),
    _case("q4_k", "q4_0", 512, 128, 2, 0.3, "gelu", torch.bfloat16),
    _case("q4_1", "q8_0", 64, 32, 1, 0.5, "silu", torch.bfloat16),
]
# the listed-rows variant: relu-family activations (the SVD predictor's home) and SiLU, lists from empty to full.
# These mix 4-bit formats in (and are fp32, which the NPU device does not run): CPU and CUDA only; the NPU's AscendC
# kernel covers q8_0 gate/up with a q8_0 W_down (W8), its cases follow.
CASES += [Case("qsparse_ffn_rows", {"qtype": gu, "down": down, "d": d, "I": I, "T": T, "keep": keep, "act": act},
               dtype, devices=("cpu", "cuda"))
          for (gu, down, d, I, T, keep, act, dtype) in (
              ("q4_0", "q4_0", 256, 96, 1, 0.1, "relu", torch.float32),
              ("q4_0", "q4_0", 256, 96, 3, 0.5, "relu2", torch.float32),
              ("q4_1", "q4_1", 64, 64, 2, 0.0, "relu", torch.float32),
              ("q4_1", "q4_1", 64, 64, 2, 1.0, "fatrelu", torch.float32),
              ("q8_0", "q8_0", 96, 128, 1, 0.3, "drelu", torch.float32),
              ("q4_k", "q4_1", 256, 64, 2, 0.4, "silu", torch.float32),
              ("q6_k", "q8_0", 512, 32, 1, 0.6, "relu", torch.bfloat16),
              ("q4_1", "q4_1", 576, 1536, 1, 0.1, "relu", torch.float32))]
# W8 (q8_0 gate/up, q8_0 W_down): every device, the NPU's kernel included (ascendc_ops/kernels/qffn.cpp; the NPU device
# runs fp16 / bf16 x). Decode first, a few tokens, lists empty / odd / full, SiLU and the relu family, 1 to 8 cores,
# SmolLM2's shape. No GELU here: down_count is h != 0, and an fp32 GELU of a very negative g underflows to exactly 0
# where the fp64 reference's does not (every fused kernel, the CPU's included, counts those neurons differently).
CASES += [Case("qsparse_ffn_rows", {"qtype": "q8_0", "down": "q8_0", "d": d, "I": I, "T": T, "keep": keep, "act": act,
                                    **({"cores": cores} if cores else {})}, dtype)
          for (d, I, T, keep, act, cores, dtype) in (
              (96, 64, 1, 0.5, "silu", None, torch.float16),
              (96, 128, 1, 0.0, "relu", None, torch.float16),
              (64, 64, 1, 1.0, "fatrelu", None, torch.float16),
              (256, 96, 3, 0.3, "relu2", 7, torch.float16),
              (128, 160, 2, 0.6, "silu", 1, torch.bfloat16),
              (64, 32, 5, 0.5, "drelu", None, torch.float16),
              (160, 224, 1, 0.2, "relu", 3, torch.float16),
              (576, 1536, 1, 0.4, "silu", None, torch.float16),
              (576, 1536, 1, 0.1, "relu", 8, torch.bfloat16),
              (576, 1536, 2, 0.4, "silu", 1, torch.float16),
              (576, 1536, 4, 0.3, "relu", None, torch.float16))]
