"""`tools/calibrate.py`'s FFN part: its arguments, the defaults they map to, and `run` (collect, calibrate,
choose by perplexity budget, write the artifact atomically)."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from sparsedge.activations import RELU_FAMILY
from sparsedge.calibrate import predictor as P
from sparsedge.calibrate.collect import check_fisher_sampling, collect
from sparsedge.calibrate.ffn import SECTION, Variant, calibrate_model, export_powerinfer
from sparsedge.evaluate import read_text, token_windows
from sparsedge.ffn import q4

def add_arguments(p) -> None:
    g = p.add_argument_group("FFN predictors")
    g.add_argument("--predictor", choices=("auto", "svd", "q4", "down"), default="auto",
                   help="auto (default): the best the project knows for the model: down for a quantized SiLU/GELU "
                        "model (a GGUF file, run in its own blocks), q4 for a float SiLU/GELU checkpoint, svd for "
                        "the ReLU family; svd: whitened low-rank gate predictor (docs/methods.md); q4: 4-bit gate x "
                        "up predictor (sdk/sparsedge/ffn/q4.py; the gate alone does not tell which SiLU neurons "
                        "matter, svd costs +61%% perplexity at 39%% on SmolLM2); down: dense gate/up, W_down rows "
                        "skipped by the exact |h| (sdk/sparsedge/ffn/downskip.py; no predictor bytes, for quantized "
                        "weights, where a predictor reads as many bytes as it saves)")
    g.add_argument("--q4-group", type=int, default=q4.DEFAULT_GROUP,
                   help="q4: inputs per quantization scale (even, divides the width; default 64)")
    g.add_argument("--q4-rounding", choices=("gptq", "nearest"), default="gptq",
                   help="q4: round the 4-bit weights so that the estimates x.w^ on the calibration text are "
                        "accurate (gptq, default) or each weight to its nearest level (nearest)")
    g.add_argument("--rank", type=int, default=None, help="predictor rank r (default max(32, 2%% of I))")
    g.add_argument("--s", type=float, default=None,
                   help="sparsity scale: per-layer target = s x true sparsity (s - 0.1 on layers 0, 1); default "
                        f"{DEFAULT_S['q4']} for q4 (SmolLM2: 41.8%% FFN sparsity at +1.85%% perplexity) and "
                        f"{DEFAULT_S['svd']} for svd")
    g.add_argument("--penalty", choices=P.PENALTIES, default=None,
                   help="threshold penalty: full = |h|*||W_down[:,i]|| (default for svd), fisher = |h * dL/dh| "
                        "with the loss gradient from a transformers backward pass over the calibration text "
                        "(default for q4), act = |act(gate)|, h = |h|")
    g.add_argument("--fisher-labels", choices=("data", "model"), default="data",
                   help="fisher penalty: gradients of the loss on the text's own next tokens (data, the empirical "
                        "Fisher) or on labels sampled from the model's prediction (model: the true Fisher, the "
                        "KL a skip adds; see --fisher-samples)")
    g.add_argument("--fisher-samples", type=int, default=1,
                   help="--fisher-labels model: label samples per token, one backward pass each (default 1)")
    g.add_argument("--allocation", choices=("layer", "global"), default=None,
                   help="layer: every layer targets s x its true sparsity (s - 0.1 on layers 0, 1); global: the "
                        "same model-wide sparsity, spread over the layers where the penalty says it costs least "
                        "(needs a penalty comparable across layers: default global with fisher, else layer)")
    g.add_argument("--tau-target", type=float, default=0.5,
                   help="silu/gelu: fraction of |act(gate)| zeroed by the per-layer tau (default 0.5)")
    g.add_argument("--no-runtime-tau", action="store_true",
                   help="silu/gelu: use tau only to define the target, do not zero h below tau at runtime")
    g.add_argument("--no-whiten", action="store_true", help="plain SVD of W_gate (ablation)")
    g.add_argument("--bias-mode", choices=("calibrated", "zero"), default="calibrated",
                   help="per-neuron calibrated thresholds (default) or one global zero threshold (ablation)")
    g.add_argument("--text-start", type=float, default=0.0,
                   help="start reading --text at this fraction of its length (0.5: its second half)")
    g.add_argument("--max-layer-tokens", type=int, default=None,
                   help="subsample at most this many tokens per layer and half (memory bound)")
    g.add_argument("--quantile-points", type=int, default=256)
    g.add_argument("--neuron-cap", type=float, default=0.95,
                   help="no neuron is predicted off on more than this fraction of the calibration tokens (default "
                        "0.95; 1 lets up to 1%% of a layer's neurons go entirely off)")
    g.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"), default=None,
                   help="also export the predictors, e.g. --export powerinfer DIR")
    g.add_argument("--ppl-budget", type=float, default=None, metavar="PCT",
                   help="choose s instead of taking --s: calibrate every s of --s-grid and keep the one with the "
                        "most FFN sparsity whose perplexity on held-out calibration text rises by at most PCT "
                        "percent (e.g. 2); fails, writing nothing, when none does")
    g.add_argument("--s-grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                   help="s values tried with --ppl-budget")
    g.add_argument("--budget-tokens", type=int, default=1024,
                   help="calibration tokens held out (not fitted) to measure perplexity with --ppl-budget")


# the operating points measured best (docs/results/ffn.md): q4 at 0.85 is SmolLM2's ≥ 40% at ≤ +2% point;
# down at DOWN_S is its quantized session's point (docs/results/sparse_quant.md)
DOWN_S = 0.4
DEFAULT_S = {"q4": 0.85, "svd": 0.8, "down": DOWN_S}


def resolve_predictor(predictor: str, activation: str | None, quantized: bool = False) -> str:
    """`auto` -> svd for the ReLU family (exact zeros); for SiLU/GELU: down when the session keeps quantized
    weights (a quantized file loaded without --dtype), else q4."""
    if predictor != "auto":
        return predictor
    if activation is None:
        raise ValueError("--predictor auto needs the model's activation; resolve it once the config is read")
    if activation in RELU_FAMILY:
        return "svd"
    return "down" if quantized else "q4"


def variant_from_args(args, activation: str | None = None, quantized: bool = False) -> Variant:
    """The calibration variant the flags ask for. `--predictor auto` is resolved from `activation` (the
    model config's) and whether the session keeps quantized weights; without the activation the flags are
    checked as if q4 were chosen where that is stricter."""
    predictor = args.predictor
    if predictor == "auto":
        predictor = resolve_predictor(predictor, activation, quantized) if activation is not None else (
            "svd" if (args.rank is not None or args.no_whiten or args.bias_mode != "calibrated") else "q4")
    if args.predictor in ("q4", "down") and (args.rank is not None or args.no_whiten or args.bias_mode != "calibrated"):
        raise ValueError(f"--rank, --no-whiten and --bias-mode configure the SVD predictor; drop them with "
                         f"--predictor {args.predictor}")
    penalty = args.penalty or ("fisher" if predictor == "q4" else "full")
    check_fisher_sampling(getattr(args, "fisher_labels", "data"), getattr(args, "fisher_samples", 1))
    allocation = args.allocation or ("global" if penalty == "fisher" else "layer")
    s = args.s if args.s is not None else DEFAULT_S[predictor]
    return Variant(s=s, penalty=penalty, whiten=not args.no_whiten, bias_mode=args.bias_mode,
                   rank=args.rank, tau_target=args.tau_target, runtime_tau=not args.no_runtime_tau,
                   predictor=predictor, group=args.q4_group, rounding=args.q4_rounding, allocation=allocation,
                   neuron_cap=args.neuron_cap)


def cfg_activation_is_smooth(model) -> bool:
    """SiLU/GELU: no exact zeros, so gate-based prediction is lossy (see sparsedge.calibrate.oracle)."""
    return model.config.activation not in RELU_FAMILY


def load_for_calibration(args, predictor: str | None = None):
    """The session calibration runs: the predictors' own kind of weights. down: as the file stores them (a
    quantized file stays quantized, so the thresholds see the int8-rounded gate/up the kernel computes);
    svd / q4: float32 unless --dtype says otherwise."""
    from sparsedge.session import Session
    dtype = getattr(args, "dtype", None)
    if predictor != "down":
        dtype = dtype or "float32"
    return Session.load(args.model, dtype=dtype, backend="cpu", progress=True)


def session_quantized(args, src=None) -> bool:
    """Whether a session for args.model without --dtype keeps quantized weights (from the file's header only;
    `src`: the model already opened with sparsedge.loading.open_model)."""
    if src is None:
        from sparsedge.loading import open_model
        src = open_model(args.model)
    return getattr(args, "dtype", None) is None and bool(getattr(src, "quantized", False))


def split_held(windows: list, args, min_fit: int) -> tuple[list, list]:
    """(fitting windows, held-out windows): the last --budget-tokens worth held out with --ppl-budget, at least
    `min_fit` windows left to fit."""
    if getattr(args, "ppl_budget", None) is None:
        return windows, []
    n_hold = max(1, -(-args.budget_tokens // args.seq_len))
    if len(windows) < n_hold + min_fit:
        raise ValueError(f"--ppl-budget needs more calibration text: {len(windows)} windows of {args.seq_len} "
                         f"tokens, {n_hold} to hold out and at least {min_fit} to fit; raise --tokens")
    return windows[:-n_hold], windows[-n_hold:]


def text_settings(args, n_tok: int) -> dict:
    """The calibration text's part of an FFN section's settings."""
    return {"text": Path(args.text).name, "text_start": args.text_start, "tokens": n_tok, "seq_len": args.seq_len}


def log_summary(summary: dict) -> None:
    logger.info("FFN calibration: " + json.dumps({k: (round(x, 4) if isinstance(x, float) else x)
                                                  for k, x in summary.items()}))


def prepare_data(session, args, grads: bool = False):
    """(fitting windows, held-out windows, xa, xb, (grads_a, grads_b) or None); windows are held out only with
    --ppl-budget; grads (collect_loss_grads) when the penalty needs them."""
    text = read_text(args.text, getattr(args, "text_start", 0.0))
    windows = token_windows(session.tokenizer, text, args.tokens, args.seq_len, require=True, flag="--tokens")
    windows, held = split_held(windows, args, min_fit=2)
    return (windows, held, *collect(session.model, args.model, windows, getattr(args, "max_layer_tokens", None),
                                     grads, fisher_labels=getattr(args, "fisher_labels", "data"),
                                     fisher_samples=getattr(args, "fisher_samples", 1)))


class BudgetError(ValueError):
    """No s of the grid keeps the perplexity increase within --ppl-budget."""


def choose_by_budget(session, xa, xb, base: Variant, s_grid: list[float], budget_pct: float,
                     held: list[list[int]], n_points: int = 256,
                     grads: tuple[list, list] | None = None) -> tuple[dict, dict, list[dict]]:
    """Calibrate one variant per s (one SVD per layer serves all), measure each on the held-out windows through
    the per-token sparse path, return (tensors, meta, table) of the sparsest within budget."""
    variants = [replace(base, s=s, name=f"s={s}") for s in s_grid]
    results = calibrate_model(session.model, xa, xb, variants, n_points=n_points, grads=grads)
    return pick_within_budget(session, s_grid, results, budget_pct, held)


def pick_within_budget(session, s_grid: list[float], results: list[tuple[dict, dict]], budget_pct: float,
                       held: list[list[int]], key: str = "ffn_sparsity") -> tuple[dict, dict, list[dict]]:
    """Measure each candidate (tensors, meta) of s_grid on the held-out windows through the per-token sparse
    path; (tensors, meta, table) of the one with the largest `key` sparsity within +budget_pct perplexity."""
    from sparsedge.evaluate import perplexity
    from sparsedge.ffn.module import attach_tensors, detach_predictors

    model = session.model
    dense = perplexity(session, held, progress=False)["ppl"]
    table = []
    for s, (tensors, meta) in tqdm(list(zip(s_grid, results)), desc="held-out perplexity per s", unit="s"):
        attach_tensors(model, tensors, meta.get("tau"), per_token=True)
        try:
            r = perplexity(session, held, progress=False)
        finally:
            detach_predictors(model)
        table.append({"s": s, "ppl": r["ppl"], "dense_ppl": dense, "ppl_increase_pct": 100 * (r["ppl"] / dense - 1),
                      "ffn_sparsity": r["ffn_sparsity"], "ffn_down_sparsity": r["ffn_down_sparsity"]})
        logger.info(f"s={s}: held-out ppl {r['ppl']:.3f} ({table[-1]['ppl_increase_pct']:+.2f}%), "
                    f"FFN sparsity {r['ffn_sparsity']:.3f}, down rows skipped {r['ffn_down_sparsity']:.3f}")
    ok = [i for i, row in enumerate(table) if row["ppl_increase_pct"] <= budget_pct]
    if not ok:
        best = min(table, key=lambda row: row["ppl_increase_pct"])
        raise BudgetError(f"no s in {s_grid} keeps the held-out perplexity within +{budget_pct}% (best: s={best['s']} "
                          f"at {best['ppl_increase_pct']:+.2f}% for {100 * best[key]:.1f}% sparsity); "
                          f"nothing was written. Raise --ppl-budget, try smaller --s-grid values, on SiLU/GELU "
                          f"models --no-runtime-tau or a lower --tau-target (the runtime tau alone zeroes that "
                          f"fraction of h), or use a ReLU-family model (python -m sparsedge.calibrate.oracle shows this "
                          f"model's bound)")
    i = max(ok, key=lambda j: table[j][key])
    return results[i][0], results[i][1], table


def parse_grid(args) -> list[float]:
    grid = [float(x) for x in args.s_grid.split(",") if x.strip()]
    if not grid or any(not 0 < x <= 1.5 for x in grid):
        raise ValueError(f"--s-grid must list s values in (0, 1.5], got {args.s_grid!r}")
    return grid


def run_down(args, session, v: Variant, t0: float) -> dict:
    """--predictor down: per-layer cuts on the true contribution (sparsedge.calibrate.downskip); no predictor."""
    from sparsedge.artifact import save_section
    from sparsedge.calibrate import downskip

    model = session.model
    from sparsedge.ffn.downskip import masked_down, warn_masked
    for qtype in sorted({layer.ffn.w_down.qtype for layer in model.layers if masked_down(layer.ffn)}):
        warn_masked(qtype)  # said before the long pass, not only when the artifact is loaded
    text = read_text(args.text, getattr(args, "text_start", 0.0))
    windows = token_windows(session.tokenizer, text, args.tokens, args.seq_len, require=True, flag="--tokens")
    windows, held = split_held(windows, args, min_fit=1)
    n_tok = sum(len(w) for w in windows)
    logger.info(f"calibration text {args.text}: {n_tok} tokens in {len(windows)} windows"
                + (f", {sum(len(w) for w in held)} held out for the perplexity budget" if held else ""))
    hist, norms = downskip.collect_histograms(model, windows)
    budget_table = None
    if args.ppl_budget is not None:
        grid = parse_grid(args)
        tensors, meta, budget_table = pick_within_budget(
            session, grid, [downskip.thresholds(hist, norms, s) for s in grid], args.ppl_budget, held,
            key="ffn_down_sparsity")
    else:
        tensors, meta = downskip.thresholds(hist, norms, v.s)
    quantized = any(getattr(layer.ffn, "quantized", False) for layer in model.layers)
    meta["settings"].update({**text_settings(args, n_tok), "weights": "quantized" if quantized else str(model.dtype)})
    if budget_table is not None:
        meta["settings"].update({"ppl_budget_pct": args.ppl_budget, "budget_table": budget_table})
    out = save_section(args.out, model, SECTION, tensors, meta)
    summary = {"out": str(out), "seconds": time.perf_counter() - t0, "predictor": "down", "s": meta["settings"]["s"],
               **meta["mean"]}
    if budget_table is not None:
        summary["budget_table"] = budget_table
    log_summary(summary)
    return summary


def run(args) -> dict:
    if args.export and args.export[0] != "powerinfer":
        raise SystemExit(f"--export: unknown format {args.export[0]!r} (supported: powerinfer)")
    if args.export and args.predictor == "q4":
        raise SystemExit("--export powerinfer writes PowerInfer's low-rank predictor layout; it has no 4-bit "
                         "predictor, so use it with --predictor svd")
    t0 = time.perf_counter()
    from sparsedge.loading import open_model
    src = open_model(args.model)  # config and header only
    v = variant_from_args(args, src.config.activation, session_quantized(args, src))
    if args.export and v.predictor != "svd":
        raise SystemExit(f"--export powerinfer needs the svd predictor; --predictor auto chose {v.predictor}: pass "
                         f"--predictor svd to export")
    session = load_for_calibration(args, v.predictor)
    model = session.model
    if v.predictor == "down":
        logger.info(f"FFN: down rows skipped by the exact |h| at s={v.s} (dense gate/up, no predictor)")
        return run_down(args, session, v, t0)
    logger.info(f"FFN predictor: {v.predictor} at s={v.s} (penalty {v.penalty}, allocation {v.allocation})")
    windows, held, xa, xb, grads = prepare_data(session, args, grads=v.penalty == "fisher")
    n_tok = sum(len(w) for w in windows)
    logger.info(f"calibration text {args.text}: {n_tok} tokens in {len(windows)} windows "
                f"({xa[0].shape[0]} SVD / {xb[0].shape[0]} threshold tokens per layer)"
                + (f", {sum(len(w) for w in held)} held out for the perplexity budget" if held else ""))
    budget_table = None
    if args.ppl_budget is not None:
        tensors, meta, budget_table = choose_by_budget(session, xa, xb, v, parse_grid(args), args.ppl_budget, held,
                                                       n_points=args.quantile_points, grads=grads)
        v = replace(v, s=meta["settings"]["s"])
    else:
        [(tensors, meta)] = calibrate_model(model, xa, xb, [v], n_points=args.quantile_points, grads=grads)
    meta["settings"].update({**text_settings(args, n_tok), "dtype": str(args.dtype or "float32"), "chat_template": False})
    if v.penalty == "fisher":
        meta["settings"].update({"fisher_labels": args.fisher_labels, "fisher_samples": args.fisher_samples})
    if budget_table is not None:
        meta["settings"].update({"ppl_budget_pct": args.ppl_budget, "budget_table": budget_table,
                                 "held_out_tokens": sum(len(w) for w in held)})
    from sparsedge.artifact import save_section
    out = save_section(args.out, model, SECTION, tensors, meta)
    summary = {"out": str(out), "seconds": time.perf_counter() - t0, **meta["mean"], "predictor": v.predictor,
               **({"group": v.group} if v.predictor == "q4" else {"rank": meta["rank"][0]}), "s": v.s,
               "penalty": v.penalty, "allocation": v.allocation}
    if budget_table is not None:
        summary["budget_table"] = budget_table
    if args.export:
        summary["export"] = str(export_powerinfer(tensors, model.config.n_layers, args.export[1]))
    if cfg_activation_is_smooth(model) and v.predictor == "svd":
        logger.warning(f"{model.config.activation} model: SVD predictors estimate the gate only, and on SiLU/GELU "
                       f"models even the exact gate is a poor guide to which neurons matter (SmolLM2-135M: 40% "
                       f"skipped costs +9.4% perplexity with the true gate and per-neuron cuts). Use --predictor "
                       f"q4, which estimates gate x up; check the quality with tools/eval.py ppl and the bound "
                       f"with python -m sparsedge.calibrate.oracle")
    log_summary(summary)
    return summary
