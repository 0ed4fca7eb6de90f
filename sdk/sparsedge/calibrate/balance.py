"""Offline half of q/k channel balancing (sparsedge.delta.balance explains the method): the power-of-two key
scales computed from captured calibration q/k, and the captures as the folded model would produce them."""
from __future__ import annotations

import torch

from sparsedge.delta.balance import MAX_LOG2


def key_scales_from_captures(per_layer: list[list[tuple]], n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """[L, H, D] power-of-two key scales from captured (q [T, Hq, D], k [T, H, D], ...) windows.

    s = rms of q per channel (over tokens and the group's query heads), geometric mean over each rotary
    pair, normalised per KV head so the rms of the scaled key deltas equals that of the unscaled ones (the
    theta grid keeps its meaning), then rounded to a power of two in the log domain."""
    G = n_heads // n_kv_heads
    D = next(s[0][0].shape[-1] for s in per_layer if s)
    out = []
    for samples in per_layer:
        if not samples:  # a layer that keeps its dense (sliding-window) cache: scale 1
            out.append(torch.zeros(n_kv_heads, D, dtype=torch.float64))
            continue
        q = torch.cat([s[0] for s in samples]).double()
        q_rms = q.reshape(q.shape[0], n_kv_heads, G, D).pow(2).mean((0, 2)).sqrt().clamp_min(1e-12)  # [H, D]
        dk = torch.cat([s[1][1:].double() - s[1][:-1].double() for s in samples])  # temporal key deltas
        dk_rms = dk.pow(2).mean(0).sqrt()  # [H, D]
        half = D // 2
        log_s = torch.log2(q_rms)
        pair = 0.5 * (log_s[:, :half] + log_s[:, half:])
        log_s = torch.cat([pair, pair], 1)
        ratio = (dk_rms * torch.exp2(log_s)).pow(2).mean(1).sqrt() / dk_rms.pow(2).mean(1).sqrt().clamp_min(1e-30)
        log_s = log_s - torch.log2(ratio.clamp_min(1e-30))[:, None]
        out.append(torch.round(log_s).clamp(-MAX_LOG2, MAX_LOG2))
    return torch.exp2(torch.stack(out)).float()


def scale_captures(per_layer: list[list[tuple]], key_scale: torch.Tensor, n_heads: int) -> list[list[tuple]]:
    """The captured (q, k, v, out) windows as the folded model would produce them: q / s, k * s."""
    res = []
    for i, samples in enumerate(per_layer):
        s_k = key_scale[i]  # [H, D]
        s_q = s_k.repeat_interleave(n_heads // s_k.shape[0], 0)
        res.append([(q / s_q.to(q.dtype), k * s_k.to(k.dtype), *rest) for q, k, *rest in samples])
    return res
