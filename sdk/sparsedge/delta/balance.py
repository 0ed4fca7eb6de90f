"""Query/key channel balancing for delta attention: per-channel thresholds at no runtime cost.

One theta per KV head treats every key channel alike, but a channel's error costs score error in
proportion to the query magnitude in that channel: q.(k - k_hat) = sum_c q_c e_c with |e_c| <= theta.
Scaling key channel c by s_c and query channel c by 1/s_c leaves every score unchanged, and a uniform
theta on the scaled keys is a per-channel threshold theta / s_c on the original ones. With
s_c = rms(q_c) (over calibration tokens and the query heads of the group) every channel contributes the
same worst-case score error per unit of theta, so low-query channels give up their deltas first.

The scales are folded into the q and k rows of the fused qkv projection (and its bias), so the kernels,
the cache layout and the op schema are unchanged. Two constraints make the fold exact:
- RoPE rotates channel pairs (c, c + D/2) together, so both members of a pair share one scale;
- every scale is a power of two, so (W_q / s) and (W_k * s) are exact in any float format, RoPE commutes
  with the scaling exactly, and each product (q_c / s_c)(k_c s_c) equals q_c k_c bit for bit: the dense
  model's attention is unchanged (tests/test_delta_balance.py checks bitwise-equal logits).
Measured on SmolLM2-135M (docs/results/delta.md): at 60% delta sparsity +0.53% perplexity instead of +1.20%.

This module is the runtime half (check and fold); the scales are computed offline by
sparsedge.calibrate.balance from captured q/k.
"""
from __future__ import annotations

import torch

MAX_LOG2 = 24  # scales outside 2^-24..2^24 would risk overflow/underflow in half precision weights


def check_key_scale(key_scale, n_layers: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Validate a key scale ([L, H, D] powers of two, equal within rotary pairs); returns it as fp32 CPU."""
    ks = torch.as_tensor(key_scale, dtype=torch.float32).cpu()
    want = (n_layers, n_kv_heads, head_dim)
    if tuple(ks.shape) != want:
        raise ValueError(f"key_scale has shape {tuple(ks.shape)}, the model needs {want} (layers, KV heads, "
                         f"head_dim); recalibrate with tools/calibrate.py --delta for this model")
    if not torch.isfinite(ks).all() or (ks <= 0).any():
        raise ValueError("key_scale must be finite and > 0 everywhere")
    e = torch.log2(ks)
    if not torch.equal(e, torch.round(e)) or e.abs().max() > MAX_LOG2:
        raise ValueError(f"key_scale entries must be powers of two within 2^±{MAX_LOG2} "
                         f"(the fold into the q/k weights is exact only then)")
    half = head_dim // 2
    if not torch.equal(ks[..., :half], ks[..., half:]):
        raise ValueError("key_scale must be equal for channels c and c + head_dim/2 (RoPE rotates them together)")
    return ks


def folded_key_scale(model) -> torch.Tensor | None:
    """The key scale folded into `model` now, or None."""
    return getattr(model, "key_scale", None)


def fold_key_scale(model, key_scale) -> None:
    """Fold `key_scale` ([L, H, D] or None for none) into the model's q/k projection rows, replacing the
    scale folded before (exact: the ratio of two power-of-two scales is one). Sets `model.key_scale` (what is
    folded now) and `model.unscaled_fingerprint` (sparsedge.artifact.weights_fingerprint of the weights before
    any fold), so artifacts calibrated on the unscaled model keep matching."""
    from sparsedge.artifact import weights_fingerprint

    cfg = model.config
    L, Hq, H, D = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    old = folded_key_scale(model)
    new = None if key_scale is None else check_key_scale(key_scale, L, H, D)
    if (old is None and new is None) or (old is not None and new is not None and torch.equal(old, new)):
        return
    if old is None:
        model.unscaled_fingerprint = weights_fingerprint(model)
    ratio = (new if new is not None else torch.ones(L, H, D)) / (old if old is not None else torch.ones(L, H, D))
    G = Hq // H
    if new is not None and cfg.qk_norm:
        raise ValueError("this delta config folds a key scale into W_q/W_k, but the model normalises q and k per head "
                         "after the projection (qk_norm), which would undo it; calibrate with --no-key-balance")
    with torch.inference_mode():  # weights may be inference tensors (built under inference mode)
        for i, layer in enumerate(model.layers):
            r = ratio[i].reshape(-1)  # [H * D]
            rq = ratio[i].repeat_interleave(G, 0).reshape(-1)  # [Hq * D]
            w = layer.attention.wqkv
            if not isinstance(w, torch.Tensor):  # quantized rows: scale their fp16 block scales (exact, 2^k)
                _fold_quantized(w, 1.0 / rq, r, Hq * D, H * D)
                w = None
            for t in (w, layer.attention.bqkv):
                if t is None:
                    continue
                view = t.view(t.shape[0], -1)  # a bias [N] as [N, 1]
                view[: Hq * D] /= rq.to(t.device, t.dtype)[:, None]
                view[Hq * D: Hq * D + H * D] *= r.to(t.device, t.dtype)[:, None]
    model.key_scale = new
    if new is None:
        model.unscaled_fingerprint = None


def _fold_quantized(w, q_factor: torch.Tensor, k_factor: torch.Tensor, q_rows: int, k_rows: int) -> None:
    """Scale the q rows of a quantized qkv projection (a QWeight, or a (q, k, v) tuple) by q_factor and its k
    rows by k_factor, through QWeight.scale_rows_ (exact for power-of-two factors)."""
    parts = list(w) if isinstance(w, tuple) else [w]
    full = torch.cat([q_factor, k_factor, torch.ones(sum(p.N for p in parts) - q_rows - k_rows)])
    start = 0
    for p in parts:
        p.scale_rows_(full[start:start + p.N])
        start += p.N
