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
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from sparsedge import stats as work
from sparsedge.delta import delta_from_cli
from sparsedge.generate import decode_one_token, prefill


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
    p.add_argument("--allow-longer-context", action="store_true",
                   help="allow --seq-len above the context the model was trained on (warns)")


# ---- text ------------------------------------------------------------------------------------------
class TextTooShortError(ValueError):
    """The text holds fewer tokens than were asked for (token_windows(..., require=True))."""

    def __init__(self, message: str, available: int, wanted: int):
        super().__init__(message)
        self.available, self.wanted = available, wanted


def read_text(path, start: float = 0.0) -> str:
    if not 0.0 <= start < 1.0:
        raise ValueError(f"text start must be in [0, 1), got {start}")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return text[int(len(text) * start):]


def check_text_file(path, flag: str = "--text", start: float = 0.0) -> str:
    """The text of `path` (from `start`, a fraction of its length), or an error naming `flag` and the fix: a
    missing file (FileNotFoundError), a folder, or a text with nothing but white space (ValueError). Cheap:
    callers run it before loading a model."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p}: no such file; pass an existing UTF-8 text file")
    if not p.is_file():
        raise ValueError(f"{flag} {p} is not a file; pass a UTF-8 text file")
    try:
        text = read_text(p, start)
    except OSError as exc:
        raise ValueError(f"{flag} {p} cannot be read ({exc.strerror or exc}); pass a readable text file") from None
    if not text.strip():
        where = f" from --text-start {start}" if start else ""
        raise ValueError(f"{flag} {p} is empty{where} (no text to tokenize); pass a file with text in it")
    return text


def text_token_ids(tokenizer, text: str, n_tokens: int) -> list[int]:
    """The first n_tokens ids of `text` (no BOS), or all of them when the text holds fewer; only as much text
    as needed is tokenized (about 4 characters per token, a generous margin, doubled until enough)."""
    need_chars = max(4096, 8 * n_tokens)
    ids = tokenizer.encode(text[:need_chars], add_bos=False)
    while len(ids) < n_tokens and need_chars < len(text):
        need_chars *= 2
        ids = tokenizer.encode(text[:need_chars], add_bos=False)
    return ids[:n_tokens]


def token_windows(tokenizer, text: str, n_tokens: int, seq_len: int, require: bool = False,
                  flag: str = "--tokens") -> list[list[int]]:
    """Consecutive windows of seq_len tokens covering the first n_tokens tokens of `text` (a BOS is put
    first in each window when the tokenizer adds one by default). With require=True a text holding fewer
    than n_tokens tokens is a TextTooShortError that says how many it holds and to lower `flag`."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if n_tokens < 1:
        raise ValueError(f"{flag} must be a positive number of tokens, got {n_tokens}")
    probe = tokenizer.encode("a")
    bos = probe[0] if len(probe) > len(tokenizer.encode("a", add_bos=False)) else None
    body = seq_len - (1 if bos is not None else 0)
    ids = text_token_ids(tokenizer, text, n_tokens)
    if require and len(ids) < n_tokens:
        raise TextTooShortError(f"the text holds only {len(ids)} tokens, fewer than {flag} {n_tokens}; lower "
                                f"{flag} to at most {len(ids)} or give a longer text (nothing was written)",
                                len(ids), n_tokens)
    wins = []
    for i in range(0, len(ids), body):
        w = ids[i:i + body]
        if len(w) < 2:
            break
        wins.append(([bos] if bos is not None else []) + w)
    if not wins:
        raise ValueError(f"the text is too short to make a single evaluation/calibration window ({len(ids)} "
                         f"tokens); give a longer text")
    return wins


# ---- perplexity ------------------------------------------------------------------------------------
def window_nll(model, cache, ids: list[int], decode: bool) -> tuple[float, int]:
    """Summed NLL (nats) of predicting ids[1:] from their prefixes, and the count."""
    toks = torch.tensor(ids, dtype=torch.long, device=model.device)
    if decode:
        logits = torch.cat([decode_one_token(model, toks[t], t, cache) for t in range(len(ids) - 1)])
    else:
        logits = prefill(model, toks[:-1], cache, all_logits=True)
    nll = F.cross_entropy(logits.float(), toks[1:], reduction="sum")
    return float(nll), len(ids) - 1


def perplexity(session, windows: list[list[int]], decode: bool = False, progress: bool = True) -> dict:
    """Perplexity of `session`'s model over `windows`, plus the executed sparsity statistics."""
    from sparsedge.ffn.module import set_per_token

    model = session.model
    set_per_token(model, True)
    work.reset(model)
    max_len = max(len(w) for w in windows)
    total, count = 0.0, 0
    attn: dict = {}
    k_bytes = k_dense = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            cache = session.new_cache(max(max_len, 2))
            nll, n = window_nll(model, cache, w, decode)
            total += nll
            count += n
            for k, v in work.total(cache).items():
                attn[k] = attn.get(k, 0) + v
            k_bytes += cache.k_bytes()
            k_dense += cache.dense_k_bytes()
    elapsed = time.perf_counter() - t0
    ws = work.read(model, per_layer=True)
    out = {"ppl": math.exp(total / max(count, 1)), "nll": total / max(count, 1), "tokens": count,
           "windows": len(windows), "seconds": elapsed, "decode_path": decode,
           "ffn_predicted_sparsity": ws.ffn_predicted_sparsity, "ffn_sparsity": ws.ffn_sparsity,
           "ffn_down_sparsity": ws.ffn_down_sparsity, "attn_sparsity": None,
           "k_cache_bytes_ratio": k_bytes / k_dense if k_dense else 1.0}
    if ws.ffn_sparsity is not None:
        out["ffn_bytes_sparsity"] = ws.ffn_bytes_sparsity  # share of the FFN weight bytes (gate + up + down) not read
        out["ffn_sparsity_per_layer"] = ws.ffn_sparsity_per_layer
    if attn.get("scored_delta_entries"):
        out["attn_sparsity"] = attn["zero_delta_entries"] / attn["scored_delta_entries"]
    return out


def check_ppl_args(args) -> str:
    """Everything `run_ppl` can check before loading the model (the text file, the artifact folders, the
    numbers); returns the text. Errors name the flag."""
    from sparsedge.cli import check_artifact_flags

    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be a positive number of tokens, got {args.max_tokens}")
    if not 0.0 <= getattr(args, "text_start", 0.0) < 1.0:
        raise ValueError(f"--text-start must be in [0, 1), got {args.text_start}")
    text = check_text_file(args.text, "--text", getattr(args, "text_start", 0.0))
    check_artifact_flags(args.predictors, args.delta)
    return text


def run_ppl(args) -> dict:
    from sparsedge.session import Session

    text = check_ppl_args(args)
    session = Session.load(args.model, backend=getattr(args, "backend", "cpu"), dtype=getattr(args, "dtype", None),
                           predictors=args.predictors,
                           delta=delta_from_cli(args.delta, args.window, args.sinks),
                           max_seq_len=max(args.seq_len, 2),
                           allow_longer_context=getattr(args, "allow_longer_context", False))
    windows = token_windows(session.tokenizer, text, args.max_tokens, args.seq_len)
    n_text = sum(len(w) for w in windows)
    n_scored = sum(len(w) - 1 for w in windows)
    available = len(text_token_ids(session.tokenizer, text, args.max_tokens))
    short = available < args.max_tokens
    if short:
        logger.warning(f"{args.text} holds only {available} tokens, fewer than --max-tokens {args.max_tokens}: "
                       f"evaluating all of them ({n_scored} predicted tokens in {len(windows)} windows)")
    logger.info(f"perplexity over {n_text} tokens in {len(windows)} windows ({n_scored} predictions)"
                f"{' (decode path)' if args.decode else ''}")
    res = perplexity(session, windows, decode=args.decode)
    res.update({"model": session.source, "text": str(args.text), "predictors": args.predictors,
                "delta": args.delta, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                "text_tokens": available, "text_shorter_than_max_tokens": short})
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
