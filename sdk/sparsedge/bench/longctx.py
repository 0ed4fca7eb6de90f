"""Long-context decode: the dense-attention session against the delta-attention session, same weights.

    python tools/bench.py long --model smollm2-135m --delta ART --contexts 2048,4096,8192 --new-tokens 32 \
        --rounds 3 --text ../shared/data/wikitext-2-raw/wiki.test.raw --threads 2 --json

For each context C both sessions prefill the first C tokens of --text once, then decode --new-tokens greedy
tokens per round, rounds interleaved between the sessions (each continues its own cache, so the context grows
by rounds x new tokens over the run). Reports median/best decode tok/s, the ratio, and the K-cache bytes each
holds (sparsedge.stats: delta entries, offsets, references, sinks and window against a dense K cache).
Weights are the file's own blocks unless --dtype is given. With --predictors ART a third session runs both methods
(the FFN artifact and delta attention), so the combination's speed is measured in the same interleaved rounds.
"""
from __future__ import annotations

import statistics
import time

import torch
from loguru import logger

from sparsedge.bench.common import environment


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=None, help="dequantize to this dtype (default: the file's own blocks)")
    p.add_argument("--delta", required=True, help="delta artifact folder or a theta")
    p.add_argument("--contexts", default="2048,4096,8192")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--text", required=True, help="text whose first tokens are the prompt")
    p.add_argument("--predictors", default=None,
                   help="FFN artifact folder: also run a session with it and the delta cache ('both')")


def _decode(session, cache, token: int, pos: int, n: int) -> tuple[float, int]:
    from sparsedge.generate import decode_one_token
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            token = int(decode_one_token(session.model, token, pos + i, cache).argmax())
    return time.perf_counter() - t0, token


def run(args) -> dict:
    from sparsedge import stats as work
    from sparsedge.delta import delta_from_cli
    from sparsedge.evaluate import read_text
    from sparsedge.generate import prefill
    from sparsedge.session import Session

    contexts = [int(c) for c in args.contexts.split(",")]
    need = max(contexts) + args.rounds * args.new_tokens + 8
    from sparsedge.loading import open_model
    trained = open_model(args.model).config.max_seq_len
    if need > trained:
        raise SystemExit(f"--contexts up to {max(contexts)} + --rounds x --new-tokens need {need} positions, past the "
                         f"{trained} the model was trained on; use a context of at most "
                         f"{trained - args.rounds * args.new_tokens - 8}")
    load = dict(dtype=args.dtype, max_seq_len=need, progress=False)
    sessions = {"dense": Session.load(args.model, **load),
                "delta": Session.load(args.model, delta=delta_from_cli(args.delta), **load)}
    predictors = getattr(args, "predictors", None)
    if predictors:
        sessions["both"] = Session.load(args.model, predictors=predictors, delta=delta_from_cli(args.delta), **load)
    tok = sessions["dense"].tokenizer
    ids = tok.encode(read_text(args.text)[: 8 * max(contexts)])
    if len(ids) < max(contexts):
        raise SystemExit(f"--text holds {len(ids)} tokens, fewer than the longest context {max(contexts)}")
    rows = []
    for C in contexts:
        state = {}
        for name, s in sessions.items():
            cache = s.new_cache(need)
            work.reset(s.model)
            t0 = time.perf_counter()
            with torch.inference_mode():
                last = int(prefill(s.model, ids[:C], cache).argmax())
            state[name] = {"cache": cache, "pos": C, "tok": last, "prefill_s": time.perf_counter() - t0, "times": []}
        for _ in range(args.rounds):
            for name, s in sessions.items():
                st = state[name]
                dt, st["tok"] = _decode(s, st["cache"], st["tok"], st["pos"], args.new_tokens)
                st["pos"] += args.new_tokens
                st["times"].append(dt)
        row = {"context": C}
        for name, s in sessions.items():
            st = state[name]
            ws = work.read(s.model, st["cache"])
            row[name] = {"decode_tokens_per_s_median": args.new_tokens / statistics.median(st["times"]),
                         "decode_tokens_per_s_best": args.new_tokens / min(st["times"]),
                         "prefill_s": st["prefill_s"], "k_cache_bytes": ws.k_cache_bytes,
                         "k_cache_dense_bytes": ws.k_cache_dense_bytes, "attn_sparsity": ws.attn_sparsity}
        dense_rate = row["dense"]["decode_tokens_per_s_median"]
        row["delta_vs_dense"] = row["delta"]["decode_tokens_per_s_median"] / dense_rate
        both = ""
        if "both" in row:
            row["both_vs_dense"] = row["both"]["decode_tokens_per_s_median"] / dense_rate
            both = f", both {row['both']['decode_tokens_per_s_median']:.1f} tok/s ({row['both_vs_dense']:.2f}x)"
        logger.info(f"context {C}: dense {dense_rate:.1f} tok/s, delta {row['delta']['decode_tokens_per_s_median']:.1f} "
                    f"tok/s ({row['delta_vs_dense']:.2f}x){both}, K cache "
                    f"{row['delta']['k_cache_bytes'] / max(1, row['dense']['k_cache_bytes']):.2f} of dense")
        rows.append(row)
    return {"bench": "long", "model": args.model, "weights": args.dtype or "native", "delta": str(args.delta),
            "predictors": str(predictors) if predictors else None,
            "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows, "env": environment("cpu")}
