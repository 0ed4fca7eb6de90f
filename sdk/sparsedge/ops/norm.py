"""Decode-path elementwise ops: RMSNorm (plain and fused with the residual add) and RoPE.

RoPE uses the rotate-half convention of transformers' Llama: the pairs are (i, i + D/2).
Loaders permute llama2.c / GGUF weights into this convention.
"""
from __future__ import annotations

import torch

from sparsedge.ops.schema import FLOAT_DTYPES, define, sweep


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm_ref(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D/2] (fp32). Returns the rotated x, same dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm_ref,
       lambda x, weight, eps: torch.empty_like(x))
define("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor", add_rms_norm_ref,
       lambda residual, x, weight, eps: torch.empty_like(x))
define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", rope_ref,
       lambda x, cos, sin: torch.empty_like(x))

# parity cases (tests/test_ops.py): decode and prefill rows, SmolLM2 / Llama-7B widths, odd widths, an fp32 weight
CASES = [
    *sweep("rms_norm", FLOAT_DTYPES, shape=[(1, 576), (8, 576), (3, 4096), (2, 5, 64), (1, 7)]),
    *sweep("rms_norm", (torch.float16, torch.bfloat16), shape=[(4, 576)], fp32_weight=[True], eps=[1e-6]),
    *sweep("add_rms_norm", FLOAT_DTYPES, shape=[(1, 576), (8, 4096), (2, 3, 100)]),
    *sweep("rope", FLOAT_DTYPES, shape=[(1, 9, 64), (8, 3, 64), (5, 32, 128), (2, 2, 6)]),  # [T, H, D]
]
