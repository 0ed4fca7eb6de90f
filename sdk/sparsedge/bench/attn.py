"""Decode attention for one layer: delta buffers (sparsedge::delta_attention) vs our dense attention.

Dense baseline: the DenseLayerCache path of sparsedge.kv_cache, i.e. the fused sparsedge::dense_attention
kernel over the preallocated dense K/V cache (torch SDPA with enable_gqa is timed too, for reference).
Both are timed two ways, side by side in one run:
  kernel: the attention call alone (delta_attention vs dense_attention) at the last position of the context;
  step:   the whole layer-cache decode step (`attend`: append k/v, delta-encode, attend, bookkeeping),
          averaged over consecutive decode positions ending at the context length.
Keys: a per-channel Gaussian random walk along the token axis (temporal correlation like real post-RoPE
keys), with per-channel step sizes spread log-uniformly over a decade and their common scale bisected
so that theta gives the requested delta sparsity (--sparsity, default 0.6, the calibrated SmolLM2-135M
setting). K-side bytes: what the delta cache holds (packed deltas + offsets + reference + sinks + window)
vs a dense K cache of the same tokens.
"""
from __future__ import annotations

import math

import torch
from loguru import logger

from sparsedge.bench.common import environment, synchronize, time_fn

SHAPES = {"smollm2": (9, 3, 64), "llama1b": (32, 8, 64)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p) -> None:
    p.add_argument("--contexts", default="512,2048,8192,32768", help="comma-separated context lengths")
    p.add_argument("--shapes", default="smollm2,llama1b", help=f"comma-separated of {sorted(SHAPES)}")
    p.add_argument("--sparsity", type=float, default=0.6, help="delta sparsity the keys are calibrated to")
    p.add_argument("--theta", type=float, default=0.5)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)


def random_walk_keys(T: int, H: int, D: int, step_scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    per_chan = torch.exp(torch.empty(H, D).uniform_(math.log(0.3), math.log(3.0), generator=g))
    start = torch.randn(1, H, D, generator=g) * 2.0
    return start + (torch.randn(T, H, D, generator=g) * per_chan * step_scale).cumsum(0)


def encoded_sparsity(keys: torch.Tensor, theta: float) -> float:
    T, H, D = keys.shape
    ref = torch.zeros(H, D)
    vals = torch.zeros(H, T * D)
    chan = torch.zeros(H, T * D, dtype=torch.uint8)
    off = torch.zeros(H, T + 1, dtype=torch.int32)
    nnz = torch.ops.sparsedge.delta_encode(keys, ref, torch.full((H,), theta), vals, chan, off, 0)
    return 1.0 - float(nnz.sum() - H * D) / (H * D * (T - 1))  # token 0 is dense against the zero reference


def calibrate_step(H: int, D: int, theta: float, target: float, seed: int) -> float:
    """Common step scale of the random walk giving `target` delta sparsity at `theta` (bisection)."""
    lo, hi = 1e-3, 1e2
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        sp = encoded_sparsity(random_walk_keys(512, H, D, mid, seed), theta)
        if sp > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _shape_config(Hq, H, D):
    from sparsedge.config import ModelConfig
    return ModelConfig(vocab_size=8, dim=Hq * D, n_layers=1, n_heads=Hq, n_kv_heads=H, intermediate_size=8)


def bench_one(Hq, H, D, n, keys, theta, window, sinks, dtype, device, iters, seed) -> dict:
    from sparsedge.delta.cache import DeltaLayerCache
    from sparsedge.kv_cache import DenseLayerCache
    import torch.nn.functional as F

    ops = torch.ops.sparsedge
    g = torch.Generator().manual_seed(seed + n)
    steps = iters + 3
    n0 = n - steps  # prefilled by direct state setup, then `steps` real decode steps
    q_all = torch.randn(steps, Hq, D, generator=g).to(device=device, dtype=dtype)
    v_all = torch.randn(n, H, D, generator=g).to(device=device, dtype=dtype)
    k_all = keys[:n].to(device=device, dtype=dtype)
    # --- delta cache: state of positions < n0 (what a prefill leaves), without the O(n0^2) prefill
    dc = DeltaLayerCache(H, D, n, dtype, device, theta, window, sinks)
    dc.fill(k_all[:n0], v_all[:n0])
    # --- dense cache
    dense = DenseLayerCache(_shape_config(Hq, H, D), n, dtype, device)
    dense.k[:, :n0] = k_all[:n0].transpose(0, 1)
    dense.v[:, :n0] = v_all[:n0].transpose(0, 1)
    dense.length = n0

    def run_steps(cache):
        import time
        ts = []
        for i in range(steps):
            p = n0 + i
            synchronize(device)
            t0 = time.perf_counter()
            cache.attend(q_all[i:i + 1], k_all[p:p + 1], v_all[p:p + 1], p)
            synchronize(device)
            ts.append(time.perf_counter() - t0)
        ts = sorted(ts[3:])
        return ts[len(ts) // 2]

    with torch.inference_mode():
        t_step_delta = run_steps(dc)
        t_step_dense = run_steps(dense)
        # kernel-only at the last position (state now holds all n positions)
        q1, k1 = q_all[-1:], k_all[n - 1:n]
        t_kernel_delta = time_fn(lambda: ops.delta_attention(q1, k1, dc.v_cache, dc.values, dc.chan, dc.offsets,
                                                             dc.sink_k, dc.window_k, n - 1, sinks, window, dc.scale),
                                 device, warmup=2, iters=iters)
        qh = q1.transpose(0, 1).unsqueeze(0)
        kh, vh = dense.k[None, :, :n], dense.v[None, :, :n]
        t_kernel_sdpa = time_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=dense.scale,
                                                                       enable_gqa=True), device, warmup=2, iters=iters)
        if hasattr(ops, "dense_attention"):
            t_kernel_dense = time_fn(lambda: ops.dense_attention(q1, dense.k, dense.v, n - 1, dense.scale),
                                     device, warmup=2, iters=iters)
        else:
            t_kernel_dense = t_kernel_sdpa
        # the two agree (delta approximates; report the relative difference at this sparsity)
        od = ops.delta_attention(q1, k1, dc.v_cache, dc.values, dc.chan, dc.offsets, dc.sink_k, dc.window_k,
                                 n - 1, sinks, window, dc.scale).float()
        oref = F.scaled_dot_product_attention(qh, kh, vh, scale=dense.scale, enable_gqa=True)[0].transpose(0, 1).float()
        rel = float((od - oref).norm() / oref.norm())
    used = int(dc.offsets[:, n].sum())
    density = used / (n * H * D)
    return {"Hq": Hq, "H": H, "D": D, "context": n, "delta_density": density,
            "kernel_delta_us": t_kernel_delta * 1e6, "kernel_dense_us": t_kernel_dense * 1e6,
            "kernel_speedup": t_kernel_dense / t_kernel_delta, "kernel_sdpa_us": t_kernel_sdpa * 1e6,
            "speedup_vs_sdpa": t_kernel_sdpa / t_kernel_delta,
            "step_delta_us": t_step_delta * 1e6, "step_dense_us": t_step_dense * 1e6,
            "step_speedup": t_step_dense / t_step_delta,
            "k_bytes_delta": dc.k_bytes(), "k_bytes_dense": dc.dense_k_bytes(),
            "k_bytes_ratio": dc.k_bytes() / dc.dense_k_bytes(), "output_rel_diff": rel}


def run(args) -> dict:
    from sparsedge import ops as sops
    from sparsedge.backends import get_backend

    device = torch.device(args.device)
    be = get_backend("cpu" if device.type == "cpu" else device.type)
    fused = sops.has_fused("delta_attention", device.type)
    if not fused:
        logger.warning(f"no fused delta_attention kernel for {device.type}: timing the composite reference")
    dtype = _DTYPES[args.dtype]
    contexts = [int(x) for x in args.contexts.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        Hq, H, D = SHAPES[shape]
        scale = calibrate_step(H, D, args.theta, args.sparsity, args.seed)
        keys = random_walk_keys(max(contexts), H, D, scale, args.seed)
        for n in contexts:
            r = bench_one(Hq, H, D, n, keys, args.theta, args.window, args.sinks, dtype, device, args.iters,
                          args.seed)
            r["shape"] = shape
            rows.append(r)
            logger.info(f"{shape} ctx {n}: kernel delta {r['kernel_delta_us']:.0f}us vs dense {r['kernel_dense_us']:.0f}us "
                        f"({r['kernel_speedup']:.2f}x); step {r['step_delta_us']:.0f} vs {r['step_dense_us']:.0f}us "
                        f"({r['step_speedup']:.2f}x); K bytes {r['k_bytes_ratio']:.2f}x dense; density "
                        f"{r['delta_density']:.2f}; rel diff {r['output_rel_diff']:.3g}")
    hdr = (f"{'shape':8} {'ctx':>6} {'dens':>5} {'delta us':>9} {'dense us':>9} {'x':>5} {'sdpa us':>8} {'x':>5} "
           f"{'step d':>8} {'step D':>8} {'x':>5} {'Kbytes':>6}")
    print(hdr)
    for r in rows:
        print(f"{r['shape']:8} {r['context']:6d} {r['delta_density']:5.2f} {r['kernel_delta_us']:9.0f} "
              f"{r['kernel_dense_us']:9.0f} {r['kernel_speedup']:5.2f} {r['kernel_sdpa_us']:8.0f} "
              f"{r['speedup_vs_sdpa']:5.2f} {r['step_delta_us']:8.0f} "
              f"{r['step_dense_us']:8.0f} {r['step_speedup']:5.2f} {r['k_bytes_ratio']:6.2f}")
    return {"bench": "attn", "dense_baseline": "DenseLayerCache: fused sparsedge::dense_attention (SDPA also reported)", "fused_delta": fused,
            "keys": "per-channel Gaussian random walk, scale bisected to the target sparsity",
            "target_sparsity": args.sparsity, "theta": args.theta, "window": args.window, "sinks": args.sinks,
            "dtype": args.dtype, "backend": be.name, "env": environment(device), "rows": rows}
