"""Delta-attention ops (docs/methods.md §2, DeltaLLM): key delta encoding and hybrid attention.

Per layer and KV head h the cache holds ("delta buffer"):
  ref      [H, D]      fp32   running reference key k_hat (starts at zero, so token 0's delta is its
                              thresholded key and every reconstructed key is within theta of the true one)
  values   [H, cap]    cache dtype   packed delta values of all tokens, token after token
  chan     [H, cap]    uint8         channel index of each packed value
  offsets  [H, Tmax+1] int32         token t's deltas are values[h, offsets[h,t]:offsets[h,t+1]]; offsets[h,0] = 0
  sink_k   [H, S, D]   dense keys of positions < n_sink
  window_k [H, W, D]   ring of dense keys: position j lives at slot j % W
  v_cache  [H, Tmax, D] dense values
Delta of token t: d = k_t - ref; keep channels with |d| > theta[h]; ref[ch] += stored value.
Reconstruction: k_hat_j = sum_{t <= j} (stored deltas of t)  ->  |k_j - k_hat_j| <= theta per element.

Hybrid attention for a query at position p (keys j <= p):
  exact q.k_j   when j < n_sink or j > p - window   (the sinks, and the last `window` positions incl. p)
  q.k_hat_j     otherwise, computed as a prefix sum  q.k_hat_j = q.k_hat_{j-1} + q.d_j  (nnz(d_j) MACs)
then softmax(scale * scores) @ V as usual. With GQA one delta pattern serves the G = Hq / H query heads
of its group (query head i uses KV head i // G).
"""
from __future__ import annotations

import torch

from sparsedge.ops.schema import FLOAT_DTYPES, Case, define, rows, sweep


def delta_encode_ref(k, ref, theta, values, chan, offsets, start: int):
    """Encode k [T, H, D] (positions start..start+T-1) into the buffers, in place; returns nnz per head [H] int64.

    Raises when the packed buffer would overflow: the caller grows it first (see sparsedge.delta.cache),
    so this is a guard against silent corruption, not the capacity policy itself.
    """
    T, H, D = k.shape
    nnz = torch.zeros(H, dtype=torch.int64)
    cap = values.shape[1]
    for h in range(H):
        pos = int(offsets[h, start])
        th = float(theta[h])
        for t in range(T):
            d = k[t, h].float() - ref[h]
            ch = (d.abs() > th).nonzero().flatten()
            n = ch.numel()
            if pos + n > cap:
                raise RuntimeError(f"delta buffer capacity exceeded: head {h} needs {pos + n} > {cap} entries")
            stored = d[ch].to(values.dtype)
            values[h, pos:pos + n] = stored
            chan[h, pos:pos + n] = ch.to(torch.uint8)
            ref[h, ch] += stored.float()
            pos += n
            offsets[h, start + t + 1] = pos
            nnz[h] += n
    return nnz


def reconstruct_keys(values, chan, offsets, n: int, D: int) -> torch.Tensor:
    """k_hat [H, n, D] (fp32) from the packed deltas of positions 0..n-1."""
    H = values.shape[0]
    dense = torch.zeros(H, n, D, dtype=torch.float32, device=values.device)
    for h in range(H):
        end = int(offsets[h, n])
        if end == 0:
            continue
        counts = (offsets[h, 1:n + 1] - offsets[h, :n]).long()
        tok = torch.repeat_interleave(torch.arange(n, device=values.device), counts)
        dense[h, tok, chan[h, :end].long()] = values[h, :end].float()
    return dense.cumsum(dim=1)


def exact_mask(start: int, T: int, n: int, n_sink: int, window: int, device=None) -> torch.Tensor:
    """[T, n] bool: key j is scored exactly for the query at position start + i."""
    p = torch.arange(start, start + T, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j < n_sink) | (j > p - window)


def delta_attention_ref(q, k, v_cache, values, chan, offsets, sink_k, window_k,
                        start: int, n_sink: int, window: int, scale: float):
    """q [T, Hq, D] at positions start..start+T-1; k [T, H, D] those positions' dense keys.
    Deltas of positions 0..start+T-1 are already encoded; sink_k holds positions < n_sink (already
    written); window_k holds positions start-window..start-1 (state before this chunk). -> [T, Hq, D]."""
    T, Hq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    n = start + T
    k_hat = reconstruct_keys(values, chan, offsets, n, D)  # [H, n, D]
    exact = torch.zeros_like(k_hat)
    ns = min(n_sink, n)
    exact[:, :ns] = sink_k[:, :ns].float()
    if window > 0:
        for j in range(max(ns, start - window), start):
            exact[:, j] = window_k[:, j % window].float()
    lo = max(start, ns)
    exact[:, lo:n] = k[lo - start:].float().transpose(0, 1)
    qf = q.float().reshape(T, H, G, D).permute(1, 2, 0, 3)  # [H, G, T, D]
    s_delta = qf @ k_hat[:, None].transpose(-1, -2)  # [H, G, T, n]
    s_exact = qf @ exact[:, None].transpose(-1, -2)
    is_exact = exact_mask(start, T, n, n_sink, window, q.device)
    scores = torch.where(is_exact, s_exact, s_delta) * scale
    causal = torch.arange(n, device=q.device)[None, :] > torch.arange(start, n, device=q.device)[:, None]
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v_cache[:, None, :n].float()  # [H, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


def delta_step_ref(q, k, v, ref, theta, values, chan, offsets, sink_k, window_k, v_cache,
                   pos: int, n_sink: int, window: int, scale: float):
    """One decode step at `pos` past the sinks and the first window (pos >= n_sink, pos >= window; positions before
    pos - window already encoded, pos - window not): what sparsedge.delta.cache does per token in one op.
    v_cache[:, pos] = v; the key leaving the window (position pos - window, read from its ring slot; with no window
    the new key itself) is encoded, and the window's positions get empty delta ranges; attention of q at pos as
    delta_attention; then the ring slot takes k. q [1, Hq, D], k and v [1, H, D] -> [1, Hq, D]."""
    if q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
        raise ValueError("delta_step: one token per call (q [1, Hq, D], k and v [1, H, D])")
    if pos < n_sink or pos < window or pos >= v_cache.shape[1]:
        raise ValueError(f"delta_step: position {pos} needs n_sink ({n_sink}) <= pos, window ({window}) <= pos "
                         f"and pos < {v_cache.shape[1]} (the cache's tokens)")
    e = pos - window
    v_cache[:, pos] = v[0]
    if window:
        slot = pos % window
        delta_encode_ref(window_k[:, slot].unsqueeze(0), ref, theta, values, chan, offsets, e)
        offsets[:, e + 2:pos + 2] = offsets[:, e + 1:e + 2]
    else:
        delta_encode_ref(k, ref, theta, values, chan, offsets, pos)
    out = delta_attention_ref(q, k, v_cache, values, chan, offsets, sink_k, window_k, pos, n_sink, window, scale)
    if window:
        window_k[:, slot] = k[0]
    return out


define("delta_encode(Tensor k, Tensor(a!) ref, Tensor theta, Tensor(b!) values, Tensor(c!) chan, "
       "Tensor(d!) offsets, int start) -> Tensor",
       delta_encode_ref,
       lambda k, ref, theta, values, chan, offsets, start: k.new_empty(k.shape[1], dtype=torch.int64))
define("delta_attention(Tensor q, Tensor k, Tensor v_cache, Tensor values, Tensor chan, Tensor offsets, "
       "Tensor sink_k, Tensor window_k, int start, int n_sink, int window, float scale) -> Tensor",
       delta_attention_ref,
       lambda q, k, v_cache, values, chan, offsets, sink_k, window_k, start, n_sink, window, scale:
       torch.empty_like(q))
define("delta_step(Tensor q, Tensor k, Tensor v, Tensor(a!) ref, Tensor theta, Tensor(b!) values, Tensor(c!) chan, "
       "Tensor(d!) offsets, Tensor sink_k, Tensor(e!) window_k, Tensor(f!) v_cache, int pos, int n_sink, int window, "
       "float scale) -> Tensor",
       delta_step_ref,
       lambda q, k, v, ref, theta, values, chan, offsets, sink_k, window_k, v_cache, pos, n_sink, window, scale:
       torch.empty_like(q))


# ------------------------------------------------------------------------------------------------ parity cases
# tests/test_ops.py runs each on every device against the reference; sparsedge.testing.opcases builds the inputs.
# H KV heads of G query heads each; keys "walk": a random walk along the tokens (how real keys behave);
# theta 1e9 / 100: every delta empty; a tuple: one theta per head. chunks: the T of each call, in order (a prefill,
# decode steps, a prefill chunk at start > 0).
_SINK_WINDOW = rows("n_sink window", (4, 16), (0, 0), (0, 8), (3, 0), (2, 200))
_NPU_THETAS = [(0.0, 0.0, 0.0), (0.3, 0.15, 0.6), (1.0, 0.5, 2.0), (100.0, 50.0, 200.0)]

CASES = [
    # delta_encode: thetas x decode / prefill chunking; per-head thetas on an odd head size (D = 40)
    *sweep("delta_encode", FLOAT_DTYPES, at=rows("H D", (3, 64)), theta=[0.0, 0.4, 1.5, 1e9],
           chunks=[[1] * 6, [5, 1, 1], [8, 3]]),
    *sweep("delta_encode", (torch.float16,), at=rows("H", (3,)), D=[64, 40], theta=_NPU_THETAS, chunks=[[50, 20]],
           keys=["walk"], cores=[2]),
    *[Case("delta_encode", dict(H=H, D=64, T=T, cap=cap, key_scale=ks), dtype, raises="capacity exceeded")
      for H, T, cap, ks, dtype in [(2, 3, 100, 5.0, torch.float32), (2, 2, 70, 10.0, torch.float32),
                                   (2, 10, 100, 1.0, torch.float16)]],
    # delta_attention on an encoded cache: GQA 1..4, sinks, windows (1, wider than the context, none), a query
    # chunk, long positions; decode at several positions of one cache
    *sweep("delta_attention", FLOAT_DTYPES, theta=[0.0, 0.5, 1e9], at=rows(
        "H G D start T n_sink window", (3, 1, 64, 40, 1, 4, 16), (3, 3, 64, 40, 1, 4, 16), (2, 4, 128, 100, 1, 4, 32),
        (3, 3, 64, 0, 8, 4, 16), (3, 4, 64, 33, 5, 0, 8), (1, 3, 64, 20, 1, 0, 0), (2, 3, 64, 20, 3, 2, 1),
        (3, 3, 64, 3, 2, 8, 4), (4, 4, 64, 600, 1, 4, 64))),
    *sweep("delta_attention", (torch.float16,), at=rows("H G D", (2, 1, 64), (2, 4, 40), (1, 3, 128)),
           sw=rows("n_sink window", (4, 16), (0, 8), (2, 0)), start=[(0, 3, 17, 89)], T=[1], theta=[0.5],
           keys=["walk"], cores=[2]),
    # encode + attend chunk after chunk (the Session's calls): every buffer bit-identical to the reference's
    *sweep("delta_attention", (torch.float32, torch.bfloat16), at=rows("H G", (3, 1), (3, 3), (2, 4)),
           sw=_SINK_WINDOW, theta=[0.0, 0.4, 1e9], D=[64], chunks=[[37, 1, 1, 20, 1, 1]]),
    *sweep("delta_attention", (torch.float32, torch.float16), at=rows("H G D", (2, 2, 32), (2, 2, 128)),
           sw=rows("n_sink window", (2, 4)), theta=[0.3], chunks=[[9, 1, 5]]),
    # long-context decode on 2 CPU threads: several 256-key items per KV head (compared after the prefill)
    *sweep("delta_attention", (torch.float32, torch.bfloat16), at=rows(
        "H G n_sink window D", (3, 3, 4, 64, 64), (3, 1, 0, 0, 64), (1, 8, 2, 30, 48), (2, 4, 4, 16, 64)),
        theta=[0.4], chunks=[[1100, 1, 1]], cores=[2], compare_from=[1]),
    # theta = 0, no sinks, no window: every score through the deltas, still dense causal attention
    Case("delta_attention", dict(H=2, G=4, D=64, n_sink=0, window=0, theta=0.0, chunks=[300], vs_dense=True)),
    Case("delta_attention", dict(H=1, D=64, bad="offsets"), raises="outside the packed buffer", devices=("cpu",)),
    # delta_step: a prefill by the reference, then decode steps through the op; every buffer and output against the
    # reference's steps (GQA, sinks, windows incl. none and one, per-head thetas, growth of the delta range)
    *sweep("delta_step", (torch.float32, torch.bfloat16, torch.float16), at=rows(
        "H G D n_sink window prefill steps", (3, 3, 64, 4, 16, 30, 12), (2, 4, 128, 0, 0, 9, 6),
        (1, 1, 64, 2, 1, 5, 6), (3, 1, 40, 0, 8, 8, 10)), theta=[0.0, 0.4, 1e9]),
    Case("delta_step", dict(H=3, G=2, D=64, n_sink=4, window=8, prefill=20, steps=8, theta=(0.3, 0.15, 0.6),
                            keys="walk")),
    *sweep("delta_step", (torch.float32,), at=rows("H G D n_sink window prefill steps", (3, 3, 64, 4, 64, 1100, 3)),
           theta=[0.4], cores=[2]),
    *[Case("delta_step", dict(H=2, G=1, D=64, n_sink=4, window=16, prefill=8, steps=1), dt, raises="position 8 needs")
      for dt in (torch.float32, torch.float16)],
    *[Case("delta_step", dict(H=2, G=1, D=64, n_sink=0, window=0, prefill=4, steps=3, cap=260, key_scale=10.0), dt,
           raises="capacity exceeded") for dt in (torch.float32, torch.float16)],
]
