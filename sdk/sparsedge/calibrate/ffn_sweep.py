"""Ablation and s-sweep driver: one model load, one activation collection, many calibrations, each
evaluated for perplexity through the sparse per-token path; writes JSON and (optionally) a PNG.

    python -m sparsedge.calibrate.ffn_sweep --model smollm2-135m --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --calib-start 0.5 --tokens 16384 --eval-tokens 4096 --preset ablation --json-out docs/results/ffn_ablation.json
    python -m sparsedge.calibrate.ffn_sweep ... --preset s --plot docs/results/ffn_ppl_vs_sparsity.png

Variants are presets or given as --variant "name:s=0.8,penalty=full,whiten=1,bias_mode=calibrated,rank=64,
tau_target=0.5,runtime_tau=1" or "name:predictor=q4,s=0.8,group=64,penalty=fisher,allocation=global" (repeatable). Calibration text: --text from --calib-start (a fraction of
its length); evaluation text: --eval-text (default --text) from --eval-start (default 0), so the default
calibrates on the second half of the file and evaluates on its first tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loguru import logger

from sparsedge.calibrate.collect import collect
from sparsedge.calibrate.ffn import Variant, calibrate_model
from sparsedge.evaluate import read_text, token_windows

PRESETS = {
    "ablation": [
        Variant(name="naive SVD", whiten=False, bias_mode="zero"),
        Variant(name="+ whitening", whiten=True, bias_mode="zero"),
        Variant(name="+ per-neuron bias (penalty h)", whiten=True, bias_mode="calibrated", penalty="h"),
        Variant(name="+ full penalty", whiten=True, bias_mode="calibrated", penalty="full"),
    ],
    "s": [Variant(name=f"s={s}", s=s) for s in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)],
    "penalty": [Variant(name=f"penalty={p}", penalty=p) for p in ("full", "act", "h")],
}


def parse_variant(spec: str, base: dict) -> Variant:
    name, _, kv = spec.partition(":")
    fields = dict(base)
    for item in filter(None, kv.split(",")):
        k, _, v = item.partition("=")
        k = k.strip()
        if k in ("whiten", "runtime_tau", "hull"):
            fields[k] = v.strip() not in ("0", "false", "False", "no")
        elif k in ("penalty", "bias_mode", "predictor", "allocation", "rounding"):
            fields[k] = v.strip()
        elif k in ("rank", "group"):
            fields[k] = int(v)
        else:
            fields[k] = float(v)
    return Variant(name=name, **fields)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", required=True)
    p.add_argument("--calib-start", type=float, default=0.5)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--eval-start", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--preset", action="append", default=[], choices=sorted(PRESETS))
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--base", default="", help="defaults for every variant, e.g. 'rank=64,tau_target=0.5'")
    p.add_argument("--fisher-labels", choices=("data", "model"), default="data",
                   help="fisher penalty gradients: the text's next tokens, or labels sampled from the model")
    p.add_argument("--fisher-samples", type=int, default=1, help="label samples per token with --fisher-labels model")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--decode-check", action="store_true", help="also evaluate the first variant via --decode")
    p.add_argument("--json-out", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--save-artifacts", default=None, help="folder: write each variant's artifact under it")
    args = p.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    logger.enable("sparsedge")

    from sparsedge.evaluate import perplexity, plot_sweep
    from sparsedge.session import Session
    from sparsedge.ffn.module import attach_tensors, detach_predictors

    base = {}
    if args.base:
        given = {item.partition("=")[0].strip() for item in args.base.split(",") if item}
        base = {k: v for k, v in vars(parse_variant("base:" + args.base, {})).items() if k in given}
    variants = []
    for name in args.preset:
        for v in PRESETS[name]:
            d = dict(vars(v))
            d.update({k: x for k, x in base.items() if k not in _preset_fields(name)})
            variants.append(Variant(**d))
    variants += [parse_variant(s, {k: v for k, v in base.items()}) for s in args.variant]
    if not variants:
        p.error("give --preset and/or --variant")
    t0 = time.perf_counter()
    session = Session.load(args.model, dtype=args.dtype, backend="cpu", max_seq_len=args.seq_len)
    model = session.model
    calib_windows = token_windows(session.tokenizer, read_text(args.text, args.calib_start), args.tokens, args.seq_len)
    eval_windows = token_windows(session.tokenizer, read_text(args.eval_text or args.text, args.eval_start),
                                 args.eval_tokens, args.seq_len)
    xa, xb, grads = collect(model, args.model, calib_windows, grads=any(v.penalty == "fisher" for v in variants),
                            fisher_labels=args.fisher_labels, fisher_samples=args.fisher_samples)
    results = calibrate_model(model, xa, xb, variants, grads=grads)
    del xa, xb, grads
    rows = []
    dense = None
    if not args.no_dense:
        dense = perplexity(session, eval_windows)
        logger.info(f"dense: ppl {dense['ppl']:.4f}")
    for v, (tensors, meta) in zip(variants, results):
        attach_tensors(model, tensors, meta["tau"], session.backend, per_token=True)
        r = perplexity(session, eval_windows)
        row = {"name": v.name, "settings": meta["settings"], "ppl": r["ppl"], "tokens": r["tokens"],
               "ffn_sparsity": r["ffn_sparsity"], "ffn_down_sparsity": r["ffn_down_sparsity"],
               "ffn_bytes_sparsity": r["ffn_bytes_sparsity"], "calib": meta["mean"], "rank": meta.get("rank", [None])[0],
               "eval_seconds": r["seconds"]}
        if dense:
            row["ppl_increase"] = r["ppl"] / dense["ppl"] - 1
        if args.decode_check and not rows:
            row["ppl_decode_path"] = perplexity(session, eval_windows[:1], decode=True)["ppl"]
            row["ppl_prefill_path_window0"] = perplexity(session, eval_windows[:1])["ppl"]
        rows.append(row)
        logger.info(f"{v.name}: ppl {r['ppl']:.4f} ({100 * row.get('ppl_increase', 0):+.2f}%), executed FFN "
                    f"sparsity {r['ffn_sparsity']:.3f} (down {r['ffn_down_sparsity']:.3f}), recall "
                    f"{meta['mean']['recall']:.3f} (weighted {meta['mean']['weighted_recall']:.4f})")
        if args.save_artifacts:
            from sparsedge.artifact import save_section
            save_section(Path(args.save_artifacts) / v.name.replace(" ", "_").replace("/", "_"), model, "ffn",
                         tensors, meta)
        detach_predictors(model)
    out = {"model": session.source, "calibration": {"text": args.text, "start": args.calib_start,
                                                     "tokens": sum(len(w) for w in calib_windows)},
           "evaluation": {"text": args.eval_text or args.text, "start": args.eval_start,
                          "tokens": sum(len(w) for w in eval_windows), "seq_len": args.seq_len},
           "dense_ppl": dense["ppl"] if dense else None, "variants": rows, "seconds": time.perf_counter() - t0}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    if args.plot:
        pts = [{"ffn_sparsity": r["ffn_sparsity"], "ppl": r["ppl"], "label": r["name"]} for r in rows]
        plot_sweep(pts, args.plot, dense["ppl"] if dense else None,
                   title=f"{session.config.name}: perplexity vs executed FFN sparsity (WikiText-2, "
                         f"{out['evaluation']['tokens']} tokens)")
    print(json.dumps(out))
    return 0


def _preset_fields(name: str) -> set:
    return {"ablation": {"whiten", "bias_mode", "penalty"}, "s": {"s"}, "penalty": {"penalty"}}[name]


if __name__ == "__main__":
    sys.exit(main())
