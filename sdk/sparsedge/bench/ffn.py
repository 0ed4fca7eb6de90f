"""FFN layer speed: fused sparse FFN vs our dense FFN, same shapes and dtype, side by side.

    python tools/bench.py ffn [--shapes llama2-7b,llama3.2-1b] [--dtypes float32,bfloat16]
                              [--densities 0.05,0.1,0.2,0.5,1.0] [--device cpu|cuda] [--json]

One FFN layer (gate/up [I, d], W_down^T [I, d]) at batch 1. Several layers' worth of weights are
allocated (at least --min-mib in total, well beyond the last-level cache) and calls rotate through
them, so every call streams its weights from DRAM. Each call gets a fresh input x, hence a fresh
active set: the predictor (rank max(32, 2% of I), fused into `sparsedge::sparse_ffn`) has its biases set so
that the expected fraction of predicted-active neurons is the requested density. The dense baseline
is sparsedge.model.DenseFFN (torch matmuls) on the same weights. Achieved bandwidth = weight bytes
the call must read / time. The activation is silu without tau, so every predicted-active row is also
accumulated in the down projection (no second-level zeros flatter the sparse path).

--predictor q4 runs the 4-bit gate x up predictor instead (`ffn_predict_q4` on 4-bit copies of each layer's
own W_gate/W_up, thresholds at each neuron's (1 - density) quantile, then `sparse_ffn_rows`); its bytes
(I x d plus scales) count in the sparse side's bandwidth.

`decode_relu_1b(args)` is the end-to-end variant: a randomly initialised relu Llama of 1B shape in our
engine, dense vs predictors forced to --density (wired as `bench.py decode --synthetic-1b`).
"""
from __future__ import annotations

import math
import statistics
import time

import torch
from loguru import logger

from sparsedge.bench.common import copy_bandwidth, environment, synchronize

SHAPES = {"llama2-7b": (4096, 11008), "llama3.2-1b": (2048, 8192), "smollm2-135m": (576, 1536)}
_DT = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
       "float16": torch.float16, "fp16": torch.float16}


def add_arguments(p) -> None:
    p.add_argument("--shapes", default="llama2-7b,llama3.2-1b", help=f"comma list of {', '.join(SHAPES)} or DxI")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.5,1.0")
    p.add_argument("--min-mib", type=int, default=320, help="total weights allocated per case (rotated through)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--activation", default="silu")
    p.add_argument("--rank", type=int, default=None, help="predictor rank (default max(32, 2%% of I))")
    p.add_argument("--predictor", choices=("svd", "q4"), default="svd",
                   help="svd: the fused sparse_ffn op with a low-rank predictor; q4: ffn_predict_q4 (4-bit gate x "
                        "up, packed from each layer's own weights) then sparse_ffn_rows")
    p.add_argument("--q4-group", type=int, default=64)


def _shape(name: str) -> tuple[int, int]:
    if name in SHAPES:
        return SHAPES[name]
    d, _, i = name.lower().partition("x")
    return int(d), int(i)


def _randn(shape, dtype, device, gen_seed):
    t = torch.empty(shape, dtype=dtype, device=device)
    t.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=torch.Generator(device=device).manual_seed(gen_seed))
    return t


def forced_predictor(d: int, I: int, rank: int, density: float, dtype, device, seed: int = 0,
                     x_rms: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random P1 [r, d], P2 [I, r] and a bias that makes each neuron active with probability `density`
    for inputs x with i.i.d. entries of RMS `x_rms` (score_i ~ N(0, sigma_i^2), bias_i = -sigma_i z)."""
    gen = torch.Generator().manual_seed(seed)
    p1 = torch.randn(rank, d, generator=gen) / math.sqrt(d)
    p2 = torch.randn(I, rank, generator=gen) / math.sqrt(rank)
    sigma = x_rms * (p2 @ (p1 @ p1.T) @ p2.T).diagonal().clamp_min(1e-12).sqrt()  # exact for white x
    if density >= 1.0:
        bias = torch.full((I,), 1e30)
    elif density <= 0.0:
        bias = torch.full((I,), -1e30)
    else:
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - density))
        bias = -sigma * z
    return p1.to(device, dtype), p2.to(device, dtype), bias.to(device)


def _samples(fn, device, iters: int, warmup: int = 3) -> list[float]:
    """Sorted per-call seconds (median = typical; min = least disturbed by other processes on a shared
    machine; both are reported)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return sorted(out)


def q4_thresholds(f, density: float, activation: str, n: int = 256, seed: int = 11) -> torch.Tensor:
    """Per-neuron thresholds putting each neuron's |act(g) u| at its (1 - density) quantile over white inputs
    (the bench's x), so about `density` of the neurons are predicted active per call."""
    from sparsedge.activations import activate

    I, d = f.w_up.shape
    if density >= 1.0 or density <= 0.0:
        return torch.full((I,), -1.0 if density >= 1.0 else math.inf, device=f.w_up.device)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(f.w_up.device)
    sc = activate(x @ f.w_gate.float().T, x @ f.w_up.float().T, activation, 0.0, 0.0).abs()
    return torch.quantile(sc, 1.0 - density, dim=0)


def bench_case(d: int, I: int, dtype, density: float, device, args, layers: list, xs: list,
               packs: list | None = None) -> dict:
    from sparsedge.ffn import q4
    from sparsedge.calibrate.predictor import default_rank

    ops = torch.ops.sparsedge
    rank = args.rank or default_rank(I)
    if packs is None:
        p1, p2, bias = forced_predictor(d, I, rank, density, dtype, device)
    else:
        threshs = [q4_thresholds(f, density, args.activation) for f in layers]
    elt = torch.finfo(dtype).bits // 8
    counts = []
    state = {"i": 0}

    def sparse_call():
        i = state["i"]
        state["i"] += 1
        k = i % len(layers)
        f, x = layers[k], xs[i % len(xs)]
        if packs is not None:
            idx, c = ops.ffn_predict_q4(x, packs[k][0], packs[k][1], threshs[k], args.activation, 0.0)
            y, dc = ops.sparse_ffn_rows(x, idx, c, f.w_gate, f.w_up, f.w_down_t, args.activation, 0.0, 0.0)
        else:
            y, c, dc = ops.sparse_ffn(x, p1, p2, bias, f.w_gate, f.w_up, f.w_down_t, args.activation, 0.0, 0.0)
        counts.append((c, dc))
        return y

    def dense_call():
        i = state["i"]
        state["i"] += 1
        return layers[i % len(layers)](xs[i % len(xs)])

    iters = args.iters
    s_sparse = _samples(sparse_call, device, iters)
    active = sum(int(c.sum()) for c, _ in counts) / len(counts)
    down = sum(int(dc.sum()) for _, dc in counts) / len(counts)
    s_dense = _samples(dense_call, device, iters)
    t_sparse, t_dense = s_sparse[len(s_sparse) // 2], s_dense[len(s_dense) // 2]
    if packs is None:
        pred_bytes = (p1.numel() + p2.numel()) * elt + bias.numel() * 4
    else:
        pred_bytes, rank = q4.nbytes(I, d, args.q4_group), 0
    sparse_bytes = pred_bytes + 2 * active * d * elt + down * d * elt
    dense_bytes = 3 * I * d * elt
    return {"shape": f"{d}x{I}", "d": d, "I": I, "dtype": str(dtype).replace("torch.", ""), "density": density,
            "measured_density": active / I, "down_density": down / I, "rank": rank,
            "sparse_ms": 1e3 * t_sparse, "dense_ms": 1e3 * t_dense, "speedup": t_dense / t_sparse,
            "sparse_min_ms": 1e3 * s_sparse[0], "dense_min_ms": 1e3 * s_dense[0],
            "speedup_min": s_dense[0] / s_sparse[0],
            "sparse_gb_s": sparse_bytes / t_sparse / 1e9, "dense_gb_s": dense_bytes / t_dense / 1e9,
            "sparse_mib": sparse_bytes / 2**20, "dense_mib": dense_bytes / 2**20, "layers_rotated": len(layers),
            "predictor": "q4" if packs is not None else "svd", "predictor_mib": pred_bytes / 2**20}


def run(args) -> dict:
    from sparsedge.config import ModelConfig
    from sparsedge.model import DenseFFN
    from sparsedge.backends import get_backend

    device = torch.device(args.device)
    if device.type == "cpu":
        get_backend("cpu")  # load the fused kernels
    elif device.type == "cuda":
        get_backend("cuda")
    env = environment(device)
    env["copy_gb_s"] = copy_bandwidth(device, 256 << 20)
    logger.info(f"environment: {env}")
    results = []
    for shape in args.shapes.split(","):
        d, I = _shape(shape.strip())
        cfg = ModelConfig(vocab_size=8, dim=d, n_layers=1, n_heads=1, n_kv_heads=1, intermediate_size=I,
                          activation=args.activation, name=f"ffn-{d}x{I}")
        for dname in args.dtypes.split(","):
            dtype = _DT[dname.strip()]
            elt = torch.finfo(dtype).bits // 8
            layer_bytes = 3 * I * d * elt
            n_layers = max(2, math.ceil((args.min_mib << 20) / layer_bytes))
            layers = [DenseFFN(cfg, _randn((2 * I, d), dtype, device, 2 * k), _randn((I, d), dtype, device, 2 * k + 1))
                      for k in range(n_layers)]
            gen = torch.Generator().manual_seed(7)
            xs = [torch.randn(1, d, generator=gen).to(device, dtype) for _ in range(64)]
            logger.info(f"{shape} {dname}: {n_layers} layers x {layer_bytes / 2**20:.0f} MiB rotated")
            packs = None
            if args.predictor == "q4":
                from sparsedge.ffn.q4 import pack_gate_up
                packs = [tuple(t.to(device) for t in pack_gate_up(f.w_gate, f.w_up, args.q4_group)) for f in layers]
            for dens in (float(x) for x in args.densities.split(",")):
                r = bench_case(d, I, dtype, dens, device, args, layers, xs, packs)
                r["shape_name"] = shape
                results.append(r)
                logger.info(f"{shape} {r['dtype']} density {dens:.2f} (measured {r['measured_density']:.3f}): "
                            f"sparse {r['sparse_ms']:.3f} ms ({r['sparse_gb_s']:.1f} GB/s) vs dense "
                            f"{r['dense_ms']:.3f} ms ({r['dense_gb_s']:.1f} GB/s): {r['speedup']:.2f}x")
            del layers
    for r in results:
        print(f"{r['shape_name']:>12} {r['dtype']:>9} dens {r['density']:.2f} ({r['measured_density']:.3f}) "
              f"sparse {r['sparse_ms']:8.3f} ms {r['sparse_gb_s']:6.1f} GB/s | dense {r['dense_ms']:8.3f} ms "
              f"{r['dense_gb_s']:6.1f} GB/s | {r['speedup']:5.2f}x (min-time ratio {r['speedup_min']:5.2f}x: "
              f"{r['sparse_min_ms']:.3f} vs {r['dense_min_ms']:.3f} ms)")
    return {"benchmark": "ffn_layer", "environment": env, "results": results}


# ---- end-to-end decode on a synthetic relu-family 1B model -----------------------------------------
def _decode_tokens_per_s(model, prompt: list[int], new_tokens: int, device, forced: list[int] | None = None
                         ) -> tuple[float, list[int]]:
    """Decode rate through sparsedge.generate's steps; with `forced`, the next input token is forced[k] (teacher
    forcing) instead of the argmax, so a random model does not repeat one token and the active sets vary as
    they do on text. The work counters hold the decode steps only."""
    from sparsedge import stats as work
    from sparsedge.generate import decode_one_token, new_cache, prefill

    cache = new_cache(model, len(prompt) + new_tokens + 1)
    out = []
    with torch.inference_mode():
        logits = prefill(model, prompt, cache)
        pos = len(prompt)
        work.reset(model)  # count decode steps only (the prompt ran through dense prefill)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            t = int(logits[-1].argmax())
            if forced is not None:
                t = forced[len(out)]
            out.append(t)
            logits = decode_one_token(model, t, pos, cache)
            pos += 1
        synchronize(device)
        dt = time.perf_counter() - t0
    return new_tokens / dt, out


def decode_relu_1b(args) -> dict:
    """Our engine, dense vs predictors forced to `args.density`, on a random relu Llama of 1B shape."""
    from sparsedge import stats as work
    from sparsedge.backends import get_backend
    from sparsedge.calibrate.predictor import default_rank
    from sparsedge.ffn.module import SparseFFN
    from sparsedge.testing.synthetic import llama_1b_config, random_transformer

    device = torch.device(getattr(args, "device", "cpu"))
    be = get_backend("cuda" if device.type == "cuda" else "cpu")
    dtype = _DT[str(getattr(args, "dtype", "float32") or "float32")]
    density = float(getattr(args, "density", 0.10))
    new_tokens = int(getattr(args, "new_tokens", 32) or 32)
    repeats = int(getattr(args, "repeats", 3) or 3)
    cfg = llama_1b_config("relu")
    t0 = time.perf_counter()
    model = random_transformer(cfg, dtype=dtype, seed=0, device=device, progress=True)
    weights = getattr(args, "weights", None)
    if weights:
        from sparsedge.testing.synthetic import quantize_transformer
        quantize_transformer(model, weights, progress=True)
    logger.info(f"built random {cfg.name} ({weights or dtype}) in {time.perf_counter() - t0:.1f}s")
    prompt = list(range(100, 116))
    forced = torch.randint(0, cfg.vocab_size, (new_tokens + 8,), generator=torch.Generator().manual_seed(1)).tolist()
    dense_bytes = model.dense_weight_bytes_per_token()
    dense_ffns = [layer.ffn for layer in model.layers]
    rank = default_rank(cfg.intermediate_size)
    # the FFN inputs of this model are not white: set each neuron's bias at the (1 - density) quantile of
    # its scores on real FFN inputs, from a 256-token prefill of random tokens drawn like the decoded ones
    # (another seed), so that about `density` of the neurons are active per decoded token
    from sparsedge.generate import new_cache, prefill
    xs = {}
    n_cal = 256
    cal_tokens = torch.randint(0, cfg.vocab_size, (n_cal,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        prefill(model, cal_tokens, new_cache(model, n_cal), hidden_hook=lambda i, h: xs.__setitem__(i, h.float()))
    for i, layer in enumerate(model.layers):
        p1, p2, _ = forced_predictor(cfg.dim, cfg.intermediate_size, rank, density, torch.float32, device,
                                     seed=100 + i)
        sc = (xs[i] @ p1.T) @ p2.T
        bias = -torch.quantile(sc, 1.0 - density, dim=0)
        pdt = torch.bfloat16 if weights else dtype  # as attach_tensors places predictors on block weights
        layer.ffn = SparseFFN(layer.ffn, p1.to(pdt), p2.to(pdt), bias.float(), layer_index=i)
    be.require(*(("ffn_predict", "qsparse_ffn_rows") if weights else ("sparse_ffn",)))
    sparse_ffns = [layer.ffn for layer in model.layers]

    def use(ffns):
        for layer, f in zip(model.layers, ffns):
            layer.ffn = f

    # rounds interleaved (dense, then sparse, round after round), so a change in the machine's memory bandwidth
    # hits both; each round is a fresh cache after the same prompt
    dense_rates, sparse_rates = [], []
    for ffns in (dense_ffns, sparse_ffns):  # warm-up
        use(ffns)
        _decode_tokens_per_s(model, prompt, 4, device, forced)
    for _ in range(repeats):
        for ffns, rates in ((dense_ffns, dense_rates), (sparse_ffns, sparse_rates)):
            use(ffns)
            rates.append(_decode_tokens_per_s(model, prompt, new_tokens, device, forced)[0])
    ws = work.read(model)  # the sparse decode steps of the last round
    active, down = 1.0 - ws.ffn_sparsity, 1.0 - ws.ffn_down_sparsity
    sparse_bytes = ws.weight_bytes_per_token
    res = {"benchmark": "decode_synthetic_1b", "model": cfg.name, "dtype": str(dtype).replace("torch.", ""),
           "weights": weights or "float",
           "threads": torch.get_num_threads(), "new_tokens": new_tokens, "forced_density": density,
           "measured_density": active, "down_density": down, "rank": rank,
           "dense_tokens_per_s": max(dense_rates), "sparse_tokens_per_s": max(sparse_rates),
           "speedup": max(sparse_rates) / max(dense_rates),
           "speedup_median": statistics.median(sparse_rates) / statistics.median(dense_rates),
           "dense_rates": dense_rates, "sparse_rates": sparse_rates,
           "dense_weight_mib_per_token": dense_bytes / 2**20, "sparse_weight_mib_per_token": sparse_bytes / 2**20,
           "dense_gb_s": dense_bytes * max(dense_rates) / 1e9, "sparse_gb_s": sparse_bytes * max(sparse_rates) / 1e9,
           "environment": environment(device)}
    logger.info(f"synthetic 1B relu decode: dense {res['dense_tokens_per_s']:.2f} tok/s, sparse "
                f"{res['sparse_tokens_per_s']:.2f} tok/s at density {active:.3f}: {res['speedup']:.2f}x best, "
                f"{res['speedup_median']:.2f}x median (rounds interleaved)")
    return res
