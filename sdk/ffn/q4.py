"""The 4-bit gate x up predictor: for SiLU/GELU models, where no estimate of the gate alone is good enough.

A SiLU neuron's output is h_i = silu(g_i) * u_i: a neuron with a large gate but a small up projection
contributes nothing, and one with a modest gate but a large u_i matters. A predictor that sees only the
gate (the whitened-SVD one, or even the exact gate) cannot tell them apart; on SmolLM2-135M the exact gate
with per-neuron cuts costs +9.4% perplexity at 40% of neurons skipped, where the true contribution costs
+1.5% (docs/results/ffn.md). This predictor estimates both projections instead, from W_gate and W_up
rounded to 4 bits per weight (symmetric, one fp32 scale per group of `group` inputs), and predicts neuron i
active when |act(g^_i) * u^_i| > thresh_i. The thresholds come from the same greedy per-neuron heap as the
SVD predictor's biases (predictor.calibrate_thresholds), by default with the fisher penalty (each skip
weighed by the loss change it causes) and the model-wide sparsity allocated across layers.

What it reads per token: I x d bytes for both projections plus the scales (at group 64, 1/7 of the bf16
gate+up weights, 1/14 of fp32), against r x (d + I) predictor weights for the SVD predictor. The layout and
the exact arithmetic are in sdk/ops/ffn.py (`ffn_predict_q4`).
"""
from __future__ import annotations

import torch

DEFAULT_GROUP = 64


def check_group(d: int, group: int) -> None:
    if group < 2 or group % 2 or d % group:
        raise ValueError(f"4-bit predictor group size {group} must be even and divide the model width d={d} "
                         f"(64 or 32 divide every common width; pass --q4-group)")


def quantize_rows(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [I, d] -> (nibbles uint8 [I, d/2] in the op's layout, scale fp32 [I, d/group])."""
    I, d = w.shape
    check_group(d, group)
    wg = w.detach().float().cpu().reshape(I, d // group, group)
    scale = wg.abs().amax(-1) / 7.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = (torch.round(wg * inv[..., None]).clamp(-8, 7) + 8).to(torch.uint8)
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)  # byte j: input j (low), input j + group/2 (high)
    return packed.reshape(I, d // 2).contiguous(), scale.contiguous()


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_rows up to rounding: [I, d/2] uint8, [I, d/group] -> fp32 [I, d]."""
    I, ng = scale.shape
    p = packed.reshape(I, ng, -1)
    q = torch.cat([p & 15, p >> 4], -1).float() - 8.0
    return (q * scale[..., None]).reshape(I, -1)


def pack_gate_up(w_gate: torch.Tensor, w_up: torch.Tensor, group: int = DEFAULT_GROUP
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [I, 2, d/2] uint8, scale [I, 2, d/group] fp32): the tensors ffn_predict_q4 reads."""
    qg, sg = quantize_rows(w_gate, group)
    qu, su = quantize_rows(w_up, group)
    return torch.stack([qg, qu], 1).contiguous(), torch.stack([sg, su], 1).contiguous()


def validate(q: torch.Tensor, scale: torch.Tensor, thresh: torch.Tensor, I: int, d: int) -> None:
    """Raise ValueError naming what does not fit an FFN of width d and I neurons."""
    if q.dtype != torch.uint8 or tuple(q.shape) != (I, 2, d // 2):
        raise ValueError(f"4-bit predictor q is {q.dtype} {tuple(q.shape)}, expected uint8 {(I, 2, d // 2)}")
    if scale.dim() != 3 or tuple(scale.shape[:2]) != (I, 2) or scale.shape[2] == 0 or d % scale.shape[2]:
        raise ValueError(f"4-bit predictor scale is {tuple(scale.shape)}, expected ({I}, 2, d/group) with d={d}")
    check_group(d, d // scale.shape[2])
    if tuple(thresh.shape) != (I,):
        raise ValueError(f"4-bit predictor thresh is {tuple(thresh.shape)}, expected ({I},)")


def nbytes(I: int, d: int, group: int) -> int:
    """Bytes the predictor reads per token: nibbles, scales, thresholds."""
    return I * d + I * 2 * (d // group) * 4 + I * 4
