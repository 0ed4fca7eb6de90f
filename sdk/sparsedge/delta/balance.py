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
"""
from __future__ import annotations

import torch

MAX_LOG2 = 24  # scales outside 2^-24..2^24 would risk overflow/underflow in half precision weights


def key_scales_from_captures(per_layer: list[list[tuple]], n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """[L, H, D] power-of-two key scales from captured (q [T, Hq, D], k [T, H, D], ...) windows.

    s = rms of q per channel (over tokens and the group's query heads), geometric mean over each rotary
    pair, normalised per KV head so the rms of the scaled key deltas equals that of the unscaled ones (the
    theta grid keeps its meaning), then rounded to a power of two in the log domain."""
    G = n_heads // n_kv_heads
    out = []
    for samples in per_layer:
        q = torch.cat([s[0] for s in samples]).double()
        D = q.shape[-1]
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


def set_key_scale(model, key_scale) -> None:
    """Fold `key_scale` ([L, H, D] or None for none) into the model's q/k projection rows, replacing the
    scale folded before (exact: the ratio of two power-of-two scales is one). The weights fingerprint of
    the unscaled model is kept, so artifacts keep matching."""
    cfg = model.config
    L, Hq, H, D = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    old = getattr(model, "key_scale", None)
    new = None if key_scale is None else check_key_scale(key_scale, L, H, D)
    if (old is None and new is None) or (old is not None and new is not None and torch.equal(old, new)):
        return
    if old is None:
        model._unscaled_fingerprint = model.weights_fingerprint()
    ratio = (new if new is not None else torch.ones(L, H, D)) / (old if old is not None else torch.ones(L, H, D))
    G = Hq // H
    with torch.inference_mode():  # weights may be inference tensors (built under inference mode)
        for i, layer in enumerate(model.layers):
            r = ratio[i].reshape(-1)  # [H * D]
            rq = ratio[i].repeat_interleave(G, 0).reshape(-1)  # [Hq * D]
            for t in (layer.attention.wqkv, layer.attention.bqkv):
                if t is None:
                    continue
                view = t.view(t.shape[0], -1)  # a bias [N] as [N, 1]
                view[: Hq * D] /= rq.to(t.device, t.dtype)[:, None]
                view[Hq * D: Hq * D + H * D] *= r.to(t.device, t.dtype)[:, None]
    model.key_scale = new
    if new is None:
        model._unscaled_fingerprint = None


def scale_captures(per_layer: list[list[tuple]], key_scale: torch.Tensor, n_heads: int) -> list[list[tuple]]:
    """The captured (q, k, v, out) windows as the folded model would produce them: q / s, k * s."""
    res = []
    for i, samples in enumerate(per_layer):
        s_k = key_scale[i]  # [H, D]
        s_q = s_k.repeat_interleave(n_heads // s_k.shape[0], 0)
        res.append([(q / s_q.to(q.dtype), k * s_k.to(k.dtype), *rest) for q, k, *rest in samples])
    return res
