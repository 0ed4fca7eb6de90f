"""Dense causal attention over the preallocated KV cache (the baseline the delta kernel is measured against).

  q        [T, Hq, D]     queries at positions start..start+T-1 (post-RoPE)
  k_cache  [Hkv, Tmax, D] keys of positions 0..start+T-1 already written (rows >= start+T are ignored)
  v_cache  [Hkv, Tmax, D]
  -> out   [T, Hq, D];  query head i uses KV head i // (Hq / Hkv); softmax in fp32.
"""
from __future__ import annotations

import torch

from sparsedge.ops.schema import FLOAT_DTYPES, define, rows, sweep


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


def dense_attention_window_ref(q, k_cache, v_cache, start: int, scale: float, window: int):
    """dense_attention with a sliding window (Mistral, Gemma 3's local layers): the query at position p attends
    to keys max(0, p - window + 1)..p, i.e. its last `window` positions, its own included (transformers'
    sliding_window_overlay: kv_idx > q_idx - window). window == 0: no window (dense_attention)."""
    if window < 0:
        raise ValueError(f"dense_attention_window: window must be >= 0 (0: no window), got {window}")
    T, Hq, D = q.shape
    H = k_cache.shape[0]
    n = start + T
    G = Hq // H
    lo = max(0, start + 1 - window) if window > 0 else 0  # the first key any query of the chunk sees
    k, v = k_cache[:, lo:n], v_cache[:, lo:n]
    qg = q.reshape(T, H, G, D).permute(1, 2, 0, 3).reshape(H, G * T, D)
    scores = torch.bmm(qg.float(), k.float().transpose(1, 2)) * scale
    kpos = torch.arange(lo, n, device=q.device)[None, :]
    qpos = torch.arange(start, n, device=q.device)[:, None]
    mask = (kpos > qpos) | (kpos <= qpos - window) if window > 0 else kpos > qpos
    scores = scores.view(H, G, T, n - lo).masked_fill(mask, float("-inf")).view(H, G * T, n - lo)
    out = torch.bmm(torch.softmax(scores, dim=-1), v.float())
    return out.view(H, G, T, D).permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


define("dense_attention_window(Tensor q, Tensor k_cache, Tensor v_cache, int start, float scale, int window) -> Tensor",
       dense_attention_window_ref, lambda q, k_cache, v_cache, start, scale, window: torch.empty_like(q))

# parity cases (tests/test_ops.py): H KV heads of G query heads each, chunk of T queries at positions start..
CASES = sweep("dense_attention", FLOAT_DTYPES, at=rows(
    "H G D start T", (3, 3, 64, 0, 1), (3, 3, 64, 40, 1), (8, 4, 64, 2047, 1), (3, 3, 64, 0, 17), (8, 4, 128, 100, 8),
    (2, 1, 64, 5, 3),
    # decode split into 128-key chunks (CPU): 7 query heads per KV head (groups of 4 + 3), head_dim 40 (a 32-wide
    # and an 8-wide column pass), 300 keys (a partial last chunk); head_dim 8 (stories260K); 12 (no SIMD path)
    (2, 7, 40, 299, 1), (4, 2, 8, 130, 1), (2, 2, 12, 20, 1)))
# window: decode past the window, a prefill chunk crossing it, one key, a window wider than the context, Gemma 3's
# 270M shape (one KV head of 4 queries, head_dim 256, window 512), window 0 (no window)
CASES += sweep("dense_attention_window", FLOAT_DTYPES, at=rows(
    "H G D start T window", (3, 3, 64, 40, 1, 8), (2, 2, 64, 0, 17, 5), (2, 3, 64, 10, 9, 4), (2, 1, 32, 6, 3, 1),
    (2, 2, 64, 3, 1, 8), (1, 4, 256, 600, 1, 512), (2, 2, 64, 30, 4, 0)))
