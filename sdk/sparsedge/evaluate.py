"""Perplexity evaluation through the same sparse paths as decode.

    python tools/eval.py ppl --model smollm2-135m --text wiki.test.raw --max-tokens 4096 --seq-len 512 \
        [--predictors ART] [--delta 0.8 | --delta ART] [--window W] [--sinks S] [--decode] [--json]

The text is cut into consecutive windows of --seq-len tokens (the first --max-tokens tokens of the file,
a BOS first in each window when the tokenizer adds one); each window starts from an empty cache and
scores every next-token prediction inside it. With --predictors every SparseFFN runs its fused op per
token during prefill too (per-token active sets, exactly what decode executes); --decode instead feeds the
evaluated tokens one at a time through the one-token decode step. With --delta the session's delta
cache is used in both modes.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from sparsedge.delta import delta_from_cli
from sparsedge.session import reset_counters, sum_counters


def add_ppl_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder, .gguf, llama2.c .bin or smollm2-135m")
    p.add_argument("--text", required=True, help="text file to evaluate")
    p.add_argument("--predictors", default=None, help="artifact folder with an FFN section (sparse FFN)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens evaluated (default 8 x 512)")
    p.add_argument("--seq-len", type=int, default=512, help="window length (each window starts fresh)")
    p.add_argument("--text-start", type=float, default=0.0, help="start at this fraction of the text")
    p.add_argument("--delta", default=None, help="delta attention: a float theta or an artifact folder")
    p.add_argument("--window", type=int, default=None, help="delta attention: exact local window")
    p.add_argument("--sinks", type=int, default=None, help="delta attention: exact sink tokens")
    p.add_argument("--decode", action="store_true",
                   help="run the evaluated tokens through the one-token decode path instead of prefill")
    p.add_argument("--dtype", default=None, help="weights dtype (default: the backend's)")
    p.add_argument("--backend", default="cpu")


def window_nll(model, cache, ids: list[int], decode: bool) -> tuple[float, int]:
    """Summed NLL (nats) of predicting ids[1:] from their prefixes, and the count."""
    dev = model.device
    toks = torch.tensor(ids, dtype=torch.long, device=dev)
    if decode:
        logits = torch.cat([model(toks[t:t + 1], t, cache) for t in range(len(ids) - 1)])
    else:
        logits = model(toks[:-1], 0, cache, all_logits=True)
    nll = F.cross_entropy(logits.float(), toks[1:], reduction="sum")
    return float(nll), len(ids) - 1


def perplexity(session, windows: list[list[int]], decode: bool = False, progress: bool = True) -> dict:
    """Perplexity of `session`'s model over `windows`, plus the executed sparsity statistics."""
    from sparsedge.ffn.module import SparseFFN, set_per_token

    model = session.model
    ffns = [layer.ffn for layer in model.layers]
    sparse = any(isinstance(f, SparseFFN) for f in ffns)
    set_per_token(model, True)
    reset_counters(ffns)
    model.ensure_rope(max(len(w) for w in windows))
    total, count = 0.0, 0
    attn: dict = {}
    k_bytes = k_dense = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            cache = session._new_cache()
            reset_counters(cache.layers)
            nll, n = window_nll(model, cache, w, decode)
            total += nll
            count += n
            for k, v in sum_counters(cache.layers).items():
                attn[k] = attn.get(k, 0) + v
            k_bytes += cache.k_bytes()
            k_dense += cache.dense_k_bytes()
    elapsed = time.perf_counter() - t0
    out = {"ppl": math.exp(total / max(count, 1)), "nll": total / max(count, 1), "tokens": count,
           "windows": len(windows), "seconds": elapsed, "decode_path": decode,
           "ffn_predicted_sparsity": None, "ffn_sparsity": None, "ffn_down_sparsity": None,
           "attn_sparsity": None, "k_cache_bytes_ratio": k_bytes / k_dense if k_dense else 1.0}
    if sparse:
        f = sum_counters(ffns)
        if f.get("neurons"):
            out["ffn_predicted_sparsity"] = 1.0 - f["predicted_active"] / f["neurons"]
            out["ffn_sparsity"] = 1.0 - f["gate_up_rows"] / f["neurons"]
            out["ffn_down_sparsity"] = 1.0 - f["down_active"] / f["neurons"]
            # share of the FFN weight bytes (gate + up + down) not read
            out["ffn_bytes_sparsity"] = (2 * out["ffn_sparsity"] + out["ffn_down_sparsity"]) / 3
            per_layer = []
            for fn in ffns:
                s = fn.stats()
                per_layer.append(1.0 - s["gate_up_rows"] / s["neurons"] if s.get("neurons") else None)
            out["ffn_sparsity_per_layer"] = per_layer
    if attn.get("scored_delta_entries"):
        out["attn_sparsity"] = attn["zero_delta_entries"] / attn["scored_delta_entries"]
    return out


def run_ppl(args) -> dict:
    from sparsedge.calibrate.ffn import read_text, token_windows
    from sparsedge.session import Session

    session = Session.load(args.model, backend=getattr(args, "backend", "cpu"), dtype=getattr(args, "dtype", None),
                           predictors=args.predictors,
                           delta=delta_from_cli(args.delta, args.window, args.sinks),
                           max_seq_len=max(args.seq_len, 2))
    text = read_text(args.text, getattr(args, "text_start", 0.0))
    windows = token_windows(session.tokenizer, text, args.max_tokens, args.seq_len)
    logger.info(f"perplexity over {sum(len(w) for w in windows)} tokens in {len(windows)} windows"
                f"{' (decode path)' if args.decode else ''}")
    res = perplexity(session, windows, decode=args.decode)
    res.update({"model": session.source, "text": str(args.text), "predictors": args.predictors,
                "delta": args.delta, "seq_len": args.seq_len})
    return res


def plot_sweep(points: list[dict], path, dense_ppl: float | None = None, title: str = "") -> None:
    """PNG of perplexity vs executed FFN sparsity (one point per calibration setting)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict = {}
    for p in points:
        groups.setdefault(p.get("group", ""), []).append(p)
    for name, pts in groups.items():
        pts = sorted(pts, key=lambda p: p["ffn_sparsity"])
        ax.plot([100 * p["ffn_sparsity"] for p in pts], [p["ppl"] for p in pts], "o-", label=name or None)
        for p in pts:
            if "label" in p:
                ax.annotate(p["label"], (100 * p["ffn_sparsity"], p["ppl"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    if dense_ppl:
        ax.axhline(dense_ppl, color="gray", ls="--", lw=1, label=f"dense {dense_ppl:.2f}")
        ax.axhline(dense_ppl * 1.02, color="gray", ls=":", lw=1, label="dense +2%")
    ax.set_xlabel("executed FFN sparsity (gate/up rows skipped, %)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
