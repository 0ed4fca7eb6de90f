"""Perplexity vs delta sparsity sweep (docs/results/delta.md):

    python -m sparsedge.calibrate.delta_sweep --model smollm2-135m --text wiki.test.raw --artifact ART \
        --thetas 0.4,0.8,1.2 --targets 0.5,0.6,0.7 [--decode-tokens 1024] [--predictors FFN_ART] --out docs/results

One session, one set of evaluation windows (the first --max-tokens tokens of --text, --seq-len windows);
for each setting it swaps the session's DeltaConfig and runs sparsedge.evaluate.perplexity (the real cache
and fused kernels). Per-layer thetas for other sparsity targets are re-allocated from the calibration grid
stored in the artifact (same error/sparsity curves, another Lagrange multiplier), so one calibration serves
every target; these rows are per layer even when the artifact itself is per KV head (the grid is stored per
layer), and use the artifact's key scales. Prints one JSON object last and writes a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from loguru import logger


def thetas_for_target(meta: dict, target: float) -> list[float]:
    from sparsedge.calibrate.delta import allocate_sparsity
    err = torch.tensor(meta["grid_error"])
    sp = torch.tensor(meta["grid_sparsity"])
    grid = torch.tensor(meta["grid"])
    idx = allocate_sparsity(err, sp, torch.ones(err.shape[0]), target)
    return grid[idx].tolist()


def main(argv=None) -> int:
    from sparsedge.artifact import load_section
    from sparsedge.evaluate import perplexity
    from sparsedge.evaluate import read_text, token_windows
    from sparsedge.session import Session
    from sparsedge.delta import DeltaConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", required=True)
    p.add_argument("--artifact", default=None, help="calibrated artifact with a delta section")
    p.add_argument("--predictors", default=None, help="FFN artifact to combine with")
    p.add_argument("--thetas", default="0.4,0.8,1.2")
    p.add_argument("--targets", default="0.5,0.6,0.7")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=3072)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=0, help="also run the decode path on this many tokens")
    p.add_argument("--decode-settings", default=None,
                   help="comma-separated indices of the settings to run on the decode path too (default: all)")
    p.add_argument("--out", default="docs/results")
    args = p.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    logger.enable("sparsedge")
    s = Session.load(args.model, backend="cpu", predictors=args.predictors, progress=False)
    text = read_text(args.text)
    windows = token_windows(s.tokenizer, text, args.max_tokens, args.seq_len)
    dwin = token_windows(s.tokenizer, text, args.decode_tokens, args.seq_len) if args.decode_tokens else []
    settings = [("dense", None, None)]
    settings += [(f"global theta {t}", "global", {"theta": float(t), "window": args.window, "sinks": args.sinks})
                 for t in args.thetas.split(",") if t]
    if args.artifact:
        tensors, meta = load_section(args.artifact, s.model, "delta")
        common = {"window": meta["window"], "sinks": meta["sinks"]}
        if "key_scale" in tensors:  # the calibration grid was measured on the balanced model
            common["key_scale"] = tensors["key_scale"]
        settings.append((f"calibrated (artifact, {meta.get('mode')})", "calibrated",
                         {"theta": tensors["theta"].tolist(), **common}))
        for tgt in [float(x) for x in args.targets.split(",") if x]:
            settings.append((f"calibrated target {tgt}", "calibrated", {"theta": thetas_for_target(meta, tgt), **common}))
    rows = []
    dsel = None if args.decode_settings is None else {int(x) for x in args.decode_settings.split(",") if x}
    for si, (name, kind, cfg) in enumerate(settings):
        for path, wins in (("prefill", windows), ("decode", dwin)):
            if not wins or (path == "decode" and dsel is not None and si not in dsel):
                continue
            s.delta = DeltaConfig.resolve(cfg, s.model) if cfg is not None else None
            t0 = time.perf_counter()
            r = perplexity(s, wins, decode=(path == "decode"), progress=False)
            row = {"setting": name, "kind": kind or "dense", "path": path, "ppl": r["ppl"], "tokens": r["tokens"],
                   "attn_sparsity": r["attn_sparsity"], "k_cache_bytes_ratio": r["k_cache_bytes_ratio"],
                   "seconds": time.perf_counter() - t0,
                   "theta": cfg["theta"] if cfg and not isinstance(cfg["theta"], list) else
                   ("per-layer" if cfg else None), "key_balance": bool(cfg and "key_scale" in cfg)}
            rows.append(row)
            logger.info(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    for r in rows:
        base = next(x["ppl"] for x in rows if x["kind"] == "dense" and x["path"] == r["path"])
        r["ppl_increase_pct"] = 100.0 * (r["ppl"] / base - 1.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "delta_ppl_vs_sparsity.png")
    print(json.dumps({"rows": rows, "predictors": args.predictors, "text": args.text,
                      "eval_tokens": sum(len(w) for w in windows)}))
    return 0


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {("global", "prefill"): ("o-", "global theta, prefill"), ("calibrated", "prefill"): ("s-", "calibrated per-layer, prefill"),
              ("global", "decode"): ("o--", "global theta, decode"), ("calibrated", "decode"): ("s--", "calibrated per-layer, decode")}
    balanced = any(r.get("key_balance") for r in rows)
    for (kind, pth), (st, label) in styles.items():
        if kind == "calibrated" and balanced:
            label = label.replace("per-layer", "per-layer, balanced keys")
        pts = sorted((r["attn_sparsity"] * 100, r["ppl_increase_pct"]) for r in rows
                     if r["kind"] == kind and r["path"] == pth and r["attn_sparsity"] is not None)
        if pts:
            ax.plot(*zip(*pts), st, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("delta sparsity (% of delta-scored q.k entries skipped)")
    ax.set_ylabel("WikiText-2 perplexity increase vs dense (%)")
    ax.set_title("SmolLM2-135M, delta attention (W=64, 4 sinks)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
