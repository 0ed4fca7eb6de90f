"""Dense causal attention over the preallocated KV cache (the baseline the delta kernel is measured against).

  q        [T, Hq, D]     queries at positions start..start+T-1 (post-RoPE)
  k_cache  [Hkv, Tmax, D] keys of positions 0..start+T-1 already written (rows >= start+T are ignored)
  v_cache  [Hkv, Tmax, D]
  -> out   [T, Hq, D];  query head i uses KV head i // (Hq / Hkv); softmax in fp32.
"""
from __future__ import annotations

import torch

from sparsedge.ops.schema import define


def dense_attention_ref(q, k_cache, v_cache, start: int, scale: float):
    T, Hq, D = q.shape
    H = k_cache.shape[0]
    n = start + T
    G = Hq // H
    k, v = k_cache[:, :n], v_cache[:, :n]
    qg = q.reshape(T, H, G, D).permute(1, 2, 0, 3).reshape(H, G * T, D)
    scores = torch.bmm(qg.float(), k.float().transpose(1, 2)) * scale
    if T > 1:  # causal, with the chunk starting at `start`
        mask = torch.arange(n, device=q.device)[None, :] > torch.arange(start, n, device=q.device)[:, None]
        scores = scores.view(H, G, T, n).masked_fill(mask, float("-inf")).view(H, G * T, n)
    out = torch.bmm(torch.softmax(scores, dim=-1), v.float())
    return out.view(H, G, T, D).permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


define("dense_attention(Tensor q, Tensor k_cache, Tensor v_cache, int start, float scale) -> Tensor",
       dense_attention_ref, lambda q, k_cache, v_cache, start, scale: torch.empty_like(q))
