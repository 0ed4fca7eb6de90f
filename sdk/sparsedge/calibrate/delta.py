"""Delta-attention threshold calibration (tools/calibrate.py --delta).

1. Run the dense decoder over calibration windows and capture, per layer, the post-RoPE q, k and v the
   attention hands to its cache, and the dense attention output.
1b. Unless --no-key-balance: derive power-of-two q/k channel scales (sparsedge.delta.balance) and replay
   the captures as the balanced model produces them; the scales are saved with the thetas.
2. For each layer, replay the captured window through a DeltaLayerCache (the fused kernels, exactly the
   inference path) at every theta of a grid, all KV heads at once (the query heads of group h depend only
   on KV head h's theta, so one run measures every head): relative output error
   ||o_delta - o_dense||_F / ||o_dense||_F per head group and per layer, and the delta sparsity
   (zero entries among the entries scored by delta, as sparsedge.delta.cache defines it).
3. Choose theta per layer x KV head (default; per layer with --no-per-head):
   --theta-mode error:    the largest theta whose error stays within --error-budget (grid, then bisection
                          between the bracketing grid points);
   --theta-mode sparsity: minimise sum(error^2) subject to mean sparsity >= --target-sparsity, by a
                          Lagrange multiplier found with bisection (each unit takes the grid theta that
                          minimises error^2 - mu * sparsity).
4. Measure the chosen setting once more and save the "delta" section (theta [L, H] + meta) with
   sparsedge.artifact.save_section into --out (the FFN section, if any, is kept); plus key_scale [L, H, D]
   when balanced.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from sparsedge.delta.config import DEFAULT_SINKS, DEFAULT_WINDOW, SECTION, delta_layers
from sparsedge.calibrate.balance import key_scales_from_captures, scale_captures
from sparsedge.delta.cache import DeltaLayerCache

GRID = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0, 4.0]


def add_arguments(p) -> None:
    g = p.add_argument_group("delta attention (with --delta)")
    g.add_argument("--theta-mode", choices=("error", "sparsity"), default="sparsity",
                   help="keep each layer's attention-output error under --error-budget, or reach "
                        "--target-sparsity with the least error (default)")
    g.add_argument("--error-budget", type=float, default=0.05,
                   help="relative attention-output error per layer (error mode; default 0.05)")
    g.add_argument("--target-sparsity", type=float, default=0.6,
                   help="mean delta sparsity over layers (sparsity mode; default 0.6)")
    g.add_argument("--per-head", action=argparse.BooleanOptionalAction, default=True,
                   help="one theta per layer and KV head (default; with balanced keys it measured better than "
                        "one per layer: docs/results/delta.md), or --no-per-head for one per layer")
    g.add_argument("--no-key-balance", action="store_true",
                   help="do not balance q/k channels (one theta for every key channel; ablation)")
    g.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="exact local window W (default 64)")
    g.add_argument("--sinks", type=int, default=DEFAULT_SINKS, help="exact sink tokens (default 4)")
    g.add_argument("--delta-tokens", type=int, default=2048,
                   help="calibration tokens for delta thresholds (default 2048, in --seq-len windows)")


class _Capture:
    """Layer cache that records q, k, v (and the dense output) while delegating to a dense cache."""

    def __init__(self, inner, store: list):
        self.inner, self.store = inner, store

    def attend(self, q, k, v, start):
        out = self.inner.attend(q, k, v, start)
        self.store.append((q.clone(), k.clone(), v.clone(), out.float().clone()))
        return out

    def truncate(self, n):
        return self.inner.truncate(n)


def capture(model, windows: list[list[int]]) -> list[list[tuple]]:
    """Per layer, per window: (q [T, Hq, D], k [T, H, D], v [T, H, D], dense out [T, Hq, D] fp32); empty for the
    sliding-window layers, which run their own window cache (so the captured inputs of later layers are the
    model's)."""
    from sparsedge.kv_cache import KVCache, layer_cache

    cfg = model.config
    per_layer: list[list[tuple]] = [[] for _ in range(cfg.n_layers)]
    keep = set(delta_layers(cfg))
    model.ensure_rope(max(len(w) for w in windows))
    with torch.inference_mode():
        for w in tqdm(windows, desc="capture q/k/v", unit="window"):
            layers = [layer_cache(cfg, i, len(w), model.dtype, model.device) for i in range(cfg.n_layers)]
            layers = [_Capture(c, per_layer[i]) if i in keep else c for i, c in enumerate(layers)]
            model(torch.tensor(w, dtype=torch.long, device=model.device), 0, KVCache(layers, len(w)))
    return per_layer


def head_counts(cache: DeltaLayerCache, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head: (entries scored by delta, zero entries among them) for queries start..start+T-1."""
    S, W, D = cache.n_sink, cache.window, cache.D
    off = cache.offsets[:, : start + T + 1].long()  # [H, n + 1]
    p = torch.arange(start, start + T)
    hi = p - W
    hi = hi[hi >= S]
    if hi.numel() == 0:
        z = torch.zeros(cache.H, dtype=torch.int64)
        return z, z
    count = (hi - S + 1).sum() * D
    nnz = (off[:, hi + 1] - off[:, S:S + 1]).sum(1)
    return count.expand(cache.H).clone(), count - nnz


def measure(samples: list[tuple], theta, window: int, sinks: int, G: int, dtype) -> dict:
    """Replay one layer's captured windows at theta (scalar or [H]); per-head error and sparsity."""
    q0, k0 = samples[0][0], samples[0][1]
    H, D = k0.shape[1], k0.shape[2]
    err2 = torch.zeros(H, dtype=torch.float64)
    ref2 = torch.zeros(H, dtype=torch.float64)
    scored = torch.zeros(H, dtype=torch.int64)
    zeros = torch.zeros(H, dtype=torch.int64)
    for q, k, v, dense in samples:
        T = q.shape[0]
        cache = DeltaLayerCache(H, D, T, dtype, "cpu", theta, window, sinks, initial_density=1.0)
        out = cache.attend(q, k, v, 0).float()
        diff = (out - dense).reshape(T, H, G, D)
        err2 += diff.double().pow(2).sum((0, 2, 3))
        ref2 += dense.reshape(T, H, G, D).double().pow(2).sum((0, 2, 3))
        s, z = head_counts(cache, 0, T)
        scored += s
        zeros += z
    return {"err_head": (err2 / ref2.clamp_min(1e-30)).sqrt(), "err": float((err2.sum() / ref2.sum()).sqrt()),
            "sp_head": zeros.double() / scored.clamp_min(1).double(),
            "sp": float(zeros.sum()) / max(1, int(scored.sum())), "scored_head": scored}


def _pick_error(errs: list[float], grid: list[float], budget: float, evaluate) -> float:
    """Largest theta with error <= budget: last grid point within budget, then 5 bisection steps."""
    ok = [i for i, e in enumerate(errs) if e <= budget]
    i = max(ok) if ok else 0
    if i + 1 >= len(grid):
        return grid[i]
    lo, hi = grid[i], grid[i + 1]
    for _ in range(5):
        mid = 0.5 * (lo + hi)
        if evaluate(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def allocate_sparsity(err: torch.Tensor, sp: torch.Tensor, weight: torch.Tensor, target: float) -> torch.Tensor:
    """err, sp [U, K] per unit and grid point; weight [U] (share of scored entries). Returns the chosen grid
    index per unit: argmin_k err^2 - mu * sp with mu the smallest multiplier meeting the weighted target."""
    def choice(mu):
        return (err.pow(2) - mu * sp).argmin(1)

    def mean_sp(idx):
        return float((sp.gather(1, idx[:, None])[:, 0] * weight).sum() / weight.sum())

    lo, hi = 0.0, 1.0
    while mean_sp(choice(hi)) < target and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1024
        if mean_sp(choice(mid)) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-9 * hi:
            break
    return choice(hi)


def calibrate_layers(per_layer: list[list[tuple]], G: int, dtype, mode: str, budget: float, target: float,
                     per_head: bool, window: int, sinks: int, grid=GRID) -> tuple[torch.Tensor, dict]:
    L = len(per_layer)
    H = per_layer[0][0][1].shape[1]
    errs = torch.zeros(L, H, len(grid))
    sps = torch.zeros(L, H, len(grid))
    lerr = torch.zeros(L, len(grid))
    lsp = torch.zeros(L, len(grid))
    weight = torch.zeros(L, H)
    for i in tqdm(range(L), desc="delta theta grid", unit="layer"):
        for j, th in enumerate(grid):
            m = measure(per_layer[i], th, window, sinks, G, dtype)
            errs[i, :, j], sps[i, :, j] = m["err_head"].float(), m["sp_head"].float()
            lerr[i, j], lsp[i, j] = m["err"], m["sp"]
            weight[i] = m["scored_head"].float()
    theta = torch.zeros(L, H)
    if mode == "error":
        for i in tqdm(range(L), desc="delta theta bisection", unit="layer"):
            if per_head:
                for h in range(H):
                    def ev(t, i=i, h=h):
                        th = torch.zeros(H)
                        th[h] = t
                        return float(measure(per_layer[i], th, window, sinks, G, dtype)["err_head"][h])
                    theta[i, h] = _pick_error(errs[i, h].tolist(), grid, budget, ev)
            else:
                theta[i] = _pick_error(lerr[i].tolist(), grid, budget,
                                       lambda t, i=i: measure(per_layer[i], t, window, sinks, G, dtype)["err"])
    else:
        g = torch.tensor(grid)
        if per_head:
            # a unit's error counts with its share of the layer's output energy: use the layer-relative
            # error of the head group, err_head / sqrt(H) (heads of a layer carry similar energy)
            idx = allocate_sparsity(errs.reshape(L * H, -1) / math.sqrt(H), sps.reshape(L * H, -1),
                                    weight.reshape(-1), target)
            theta = g[idx].reshape(L, H)
        else:
            idx = allocate_sparsity(lerr, lsp, weight.sum(1), target)
            theta = g[idx][:, None].expand(L, H).clone()
    # final measurement at the chosen thetas
    final_err, final_sp = [], []
    for i in range(L):
        m = measure(per_layer[i], theta[i], window, sinks, G, dtype)
        final_err.append(m["err"])
        final_sp.append(m["sp"])
    w = weight.sum(1)
    info = {"error_per_layer": final_err, "sparsity_per_layer": final_sp,
            "sparsity_mean": float((torch.tensor(final_sp) * w).sum() / w.sum()),
            "error_mean": float(sum(final_err) / L),
            "grid": list(grid), "grid_error": lerr.tolist(), "grid_sparsity": lsp.tolist()}
    return theta, info


def run(args) -> dict:
    from sparsedge.artifact import save_section
    from sparsedge.evaluate import read_text, token_windows
    from sparsedge.session import Session

    t0 = time.perf_counter()
    session = Session.load(args.model, dtype=getattr(args, "dtype", None) or "float32", backend="cpu", progress=True)
    model = session.model
    cfg = model.config
    text = read_text(args.text, getattr(args, "text_start", 0.0))
    windows = token_windows(session.tokenizer, text, args.delta_tokens, args.seq_len, require=True,
                            flag="--delta-tokens")
    n_tok = sum(len(w) for w in windows)
    logger.info(f"delta calibration: {n_tok} tokens of {args.text} in {len(windows)} windows, mode {args.theta_mode}, "
                f"window {args.window}, sinks {args.sinks}{', per head' if args.per_head else ''}")
    glob = delta_layers(cfg)
    if not glob:
        raise ValueError(f"{cfg.name}: every layer is a sliding-window layer, and delta attention runs on global "
                         f"layers only; there is nothing to calibrate")
    if len(glob) < cfg.n_layers:
        logger.info(f"delta calibration: global layers {glob}; the {cfg.n_layers - len(glob)} sliding-window layers "
                    f"keep their exact window cache (theta unused)")
    per_layer = capture(model, windows)
    key_scale = None
    balance = not getattr(args, "no_key_balance", False)
    if balance and cfg.qk_norm:  # the fold would be undone by the per-head q/k norms (delta.balance refuses it)
        logger.info("q/k channel balancing: skipped, the model normalises q and k per head after the projection")
        balance = False
    if balance:
        key_scale = key_scales_from_captures(per_layer, cfg.n_heads, cfg.n_kv_heads)
        per_layer = scale_captures(per_layer, key_scale, cfg.n_heads)
        e = torch.log2(key_scale)
        logger.info(f"q/k channel balancing: key scales 2^{int(e.min())}..2^{int(e.max())}")
    theta_g, info = calibrate_layers([per_layer[i] for i in glob], cfg.n_heads // cfg.n_kv_heads, model.dtype,
                                     args.theta_mode, args.error_budget, args.target_sparsity, args.per_head,
                                     args.window, args.sinks)
    theta = torch.zeros(cfg.n_layers, theta_g.shape[1])
    theta[glob] = theta_g
    info["delta_layers"] = glob
    meta = {"theta": theta.tolist(), "window": args.window, "sinks": args.sinks, "mode": args.theta_mode,
            "error_budget": args.error_budget if args.theta_mode == "error" else None,
            "target_sparsity": args.target_sparsity if args.theta_mode == "sparsity" else None,
            "per_head": bool(args.per_head),
            "key_balance": "rms(q) per rotary pair, power of two" if key_scale is not None else None,
            "sparsity_definition": "zero delta entries / entries of keys scored by delta (prefill, per query)",
            "text": Path(args.text).name, "text_start": getattr(args, "text_start", 0.0), "tokens": n_tok,
            "seq_len": args.seq_len, **info}
    tensors = {"theta": theta.float().contiguous()}
    if key_scale is not None:
        tensors["key_scale"] = key_scale.contiguous()
    out = save_section(args.out, model, SECTION, tensors, meta)
    summary = {"out": str(out), "seconds": time.perf_counter() - t0, "mode": args.theta_mode,
               "sparsity_mean": info["sparsity_mean"], "error_mean": info["error_mean"],
               "theta_min": float(theta.min()), "theta_max": float(theta.max()), "key_balance": key_scale is not None}
    logger.info("delta calibration: " + json.dumps({k: (round(x, 4) if isinstance(x, float) else x)
                                                    for k, x in summary.items()}))
    return summary
