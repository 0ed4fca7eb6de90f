"""End-to-end decode tokens/s: our Session vs transformers' generate, same model, prompt and threads.

Decode rate excludes prefill for both: ours from Session stats (time of the one-token forward passes),
transformers' as (t(N new tokens) - t(1 new token)) / (N - 1) with greedy decoding and a forced length.
`--synthetic-1b` instead compares our engine dense vs 10%-density predictors on a random relu-family
Llama of 1B shape (see sparsedge.bench.ffn.decode_relu_1b).
"""
from __future__ import annotations

import time

import torch
from loguru import logger

from sparsedge.bench.common import environment

PROMPT = "The history of the city begins in the early middle ages, when"


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--prompt-file", default=None,
                   help="use the first --prompt-tokens tokens of this text file as the prompt (long contexts)")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per engine; the best is reported")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--predictors", default=None)
    p.add_argument("--delta", default=None)
    p.add_argument("--synthetic-1b", action="store_true",
                   help="random relu-family 1B-shape Llama: dense vs 10%%-density predictors in our engine")
    p.add_argument("--density", type=float, default=0.10, help="forced density for --synthetic-1b")
    p.add_argument("--weights", default=None, help="--synthetic-1b: quantize the projections (q4_0, q4_1, q8_0)")


def _ours(args) -> dict:
    from sparsedge.delta import delta_from_cli
    from sparsedge.session import Session

    delta = delta_from_cli(args.delta)
    s = Session.load(args.model, dtype=args.dtype, predictors=args.predictors, delta=delta, backend=args.device
                     if args.device != "cpu" else "cpu")
    if args.prompt_file:
        from sparsedge.evaluate import read_text
        ids = s.tokenizer.encode(read_text(args.prompt_file)[: 16 * args.prompt_tokens])[: args.prompt_tokens]
        if len(ids) + args.new_tokens > s.max_seq_len:
            raise SystemExit(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed the "
                             f"context of {s.max_seq_len} tokens")
    else:
        ids = s.tokenizer.encode(args.prompt)
    s.generate(ids, max_new_tokens=4)  # warm-up
    best = None
    for _ in range(args.repeats):
        r = s.generate(ids, max_new_tokens=args.new_tokens)
        if best is None or r.stats.decode_tokens_per_s > best.stats.decode_tokens_per_s:
            best = r
    st = best.stats
    return {"decode_tokens_per_s": st.decode_tokens_per_s, "prefill_tokens_per_s": st.prefill_tokens_per_s,
            "new_tokens": st.new_tokens, "weight_bytes_per_token": st.weight_bytes_per_token,
            "weight_gb_per_s": st.weight_bytes_per_token * st.decode_tokens_per_s / 1e9,
            "token_ids": best.token_ids, "prompt_ids": ids, "stats": st.to_dict()}


def _transformers(args, prompt_ids) -> dict:
    from sparsedge.testing.hf_reference import load_transformers_model
    from sparsedge.session import parse_dtype

    model = load_transformers_model(args.model, parse_dtype(args.dtype))
    inp = torch.tensor([prompt_ids])
    n = args.new_tokens

    def run(k):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=k, min_new_tokens=k,
                                 do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out[0, inp.shape[1]:].tolist()

    run(4)  # warm-up
    best = 0.0
    ids = []
    for _ in range(args.repeats):
        t1, _ = run(1)
        tn, ids = run(n)
        best = max(best, (n - 1) / max(tn - t1, 1e-9))
    return {"decode_tokens_per_s": best, "token_ids": ids}


def run(args) -> dict:
    if args.synthetic_1b:
        from sparsedge.bench.ffn import decode_relu_1b

        return decode_relu_1b(args)
    ours = _ours(args)
    result = {"bench": "decode", "model": args.model, "dtype": args.dtype, "prompt_tokens": len(ours["prompt_ids"]),
              "new_tokens": args.new_tokens, "env": environment(args.device),
              "sparsedge": {k: v for k, v in ours.items() if k not in ("token_ids", "prompt_ids")}}
    logger.info(f"sparsedge: {ours['decode_tokens_per_s']:.1f} tok/s, "
                f"{ours['weight_gb_per_s']:.2f} GB/s of weights")
    if args.predictors or args.delta:  # the same engine without them, in the same run: the ratio that matters
        import argparse
        dense = _ours(argparse.Namespace(**{**vars(args), "predictors": None, "delta": None}))
        result["sparsedge_dense"] = {k: v for k, v in dense.items() if k not in ("token_ids", "prompt_ids")}
        result["speedup_vs_dense"] = ours["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        logger.info(f"sparsedge dense: {dense['decode_tokens_per_s']:.1f} tok/s -> {result['speedup_vs_dense']:.2f}x")
    if not args.no_transformers:
        hf = _transformers(args, ours["prompt_ids"])
        result["transformers"] = {"decode_tokens_per_s": hf["decode_tokens_per_s"]}
        result["speedup_vs_transformers"] = ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
        n_same = 0
        for a, b in zip(ours["token_ids"], hf["token_ids"]):
            if a != b:
                break
            n_same += 1
        result["greedy_tokens_matching"] = n_same
        logger.info(f"transformers: {hf['decode_tokens_per_s']:.1f} tok/s -> "
                    f"{result['speedup_vs_transformers']:.2f}x")
    return result
