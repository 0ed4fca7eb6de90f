"""sparsedge vs llama.cpp on the same GGUF file: decode and prefill tok/s, weight GB/s, greedy agreement, perplexity.

    python tools/bench.py vs-llamacpp --model smollm2-135m --threads 2 [--rounds 5] [--new-tokens 128] \
        [--prompt-tokens 128] [--ppl-text ../shared/data/wikitext-2-raw/wiki.test.raw] [--png out.png] --json

Both engines get the same file, the same thread count and the same token ids (our tokenizer's; llama.cpp is fed
ids, so tokenization cannot differ). Rounds are interleaved (llama.cpp, then ours, round after round) so a
change in machine load hits both. Decode is timed as one-token steps after a prefill of the prompt, prefill as
one call over the prompt; both report min and median seconds over the rounds as tok/s. Weight GB/s is the bytes
of weights a decode step reads (the same file for both, token-embedding row excluded) times tok/s.

llama.cpp comes from the package index: `pip install "sparsedge[bench]"` installs llama-cpp-python, which
compiles llama.cpp from source (about 10 minutes on 2 cores). Without it the benchmark says so and skips.
llama.cpp runs through its Python binding: each step costs the binding's Python overhead (tens of microseconds),
which llama-bench would not; the JSON says which path ran.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from sparsedge.bench.common import environment

INSTALL = 'pip install "sparsedge[bench]"  (llama-cpp-python; compiles llama.cpp, ~10 min on 2 cores)'
PROMPT = "The history of the city begins in the early middle ages, when"


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file or an alias (smollm2-135m)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per engine")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (tokens of --ppl-text, or the "
                                                                   "built-in prompt repeated)")
    p.add_argument("--ppl-text", default=None, help="text for the perplexity comparison (skipped without it)")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--agree-tokens", type=int, default=64, help="greedy tokens compared between the engines")
    p.add_argument("--weights", default=None, help="our weights mode (default: the file's own blocks)")
    p.add_argument("--png", default=None, help="write a bar chart here")
    p.add_argument("--predictors", action="append", default=[], metavar="[NAME=]DIR",
                   help="also run sparsedge with this FFN artifact (repeatable; e.g. down=art/), same file, "
                        "interleaved with the others; its perplexity is measured through the per-token sparse path")
    p.add_argument("--python-loop", action="store_true",
                   help="also run the dense session with the layer loop in Python (sparsedge.fused_step disabled)")


def llama_cpp_missing() -> str | None:
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed; {INSTALL}"
    return None


class LlamaCpp:
    """The slice of llama-cpp-python the benchmark needs: prefill, one-token steps, logits."""

    def __init__(self, path: str, threads: int, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama
        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                         logits_all=logits_all, verbose=False)

        self.n_vocab = self.llm.n_vocab()

    def _last(self) -> np.ndarray:
        """The last position's logits, read in place from the context (the binding keeps `scores` only with
        logits_all)."""
        import llama_cpp
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._last()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last()

    def all_logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[: len(ids)])


def _time_llama(eng: LlamaCpp, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    logits = eng.prefill(prompt)
    t1 = time.perf_counter()
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = eng.step(t)
    return t1 - t0, time.perf_counter() - t1, out


def _time_ours(target, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    from sparsedge import fused_step
    session, fused = target
    fused_step.enabled = fused
    try:
        r = session.generate(prompt, max_new_tokens=n, ignore_eos=True)
    finally:
        fused_step.enabled = True
    st = r.stats
    # decode_s covers n - 1 steps (the first new token comes from the prefill's logits)
    return st.prefill_s, st.decode_s * n / max(n - 1, 1), r.token_ids


def _ppl_llama(eng: LlamaCpp, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for w in windows:
        logits = torch.from_numpy(eng.all_logits(w[:-1]).astype(np.float32))
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        count += len(w) - 1
    return math.exp(total / count)


def _summary(samples: list[float], tokens: int) -> dict:
    return {"min_s": min(samples), "median_s": statistics.median(samples),
            "best_tokens_per_s": tokens / min(samples), "median_tokens_per_s": tokens / statistics.median(samples)}


def run(args) -> dict:
    from sparsedge.loading import resolve_alias
    from sparsedge.session import Session

    missing = llama_cpp_missing()
    if missing:
        logger.warning(f"vs-llamacpp skipped: {missing}")
        return {"benchmark": "vs_llamacpp", "skipped": missing}
    path = Path(args.model)
    if not path.exists():
        path = resolve_alias(args.model)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    session = Session.load(str(path), weights=args.weights, backend="cpu", progress=False)
    tok = session.tokenizer
    if args.ppl_text:
        from sparsedge.evaluate import read_text
        text_ids = tok.encode(read_text(args.ppl_text)[: 16 * args.prompt_tokens])
    else:
        text_ids = tok.encode(" ".join([PROMPT] * (args.prompt_tokens // 8 + 1)))
    prompt = text_ids[: args.prompt_tokens]
    n_ctx = len(prompt) + max(args.new_tokens, args.agree_tokens) + 8
    eng = LlamaCpp(str(path), threads, max(n_ctx, args.seq_len + 8))
    bytes_per_token = session.model.dense_weight_bytes_per_token()
    engines = [("llama.cpp", _time_llama, eng), ("sparsedge", _time_ours, (session, True))]
    if args.python_loop:
        engines.append(("sparsedge python loop", _time_ours, (session, False)))
    sparse_sessions = {}
    for spec in args.predictors:
        name, _, folder = spec.rpartition("=")
        name = f"sparsedge+{name or Path(folder).name}"
        sparse_sessions[name] = Session.load(str(path), weights=args.weights, predictors=folder, backend="cpu",
                                             progress=False)
        engines.append((name, _time_ours, (sparse_sessions[name], True)))
    for _, fn, target in engines:  # warm-up (page cache, thread pools, first-call setup)
        fn(target, prompt, 4)
    rows = {name: {"prefill": [], "decode": []} for name, _, _ in engines}
    for r in range(args.rounds):
        for name, fn, target in engines:
            pf, dc, _ = fn(target, prompt, args.new_tokens)
            rows[name]["prefill"].append(pf)
            rows[name]["decode"].append(dc)
        logger.info(f"round {r + 1}/{args.rounds}: decode " + ", ".join(
            f"{name} {args.new_tokens / rows[name]['decode'][-1]:.1f}" for name in rows) + " tok/s")
    res = {"benchmark": "vs_llamacpp", "model": str(path), "threads": threads, "rounds": args.rounds,
           "new_tokens": args.new_tokens, "prompt_tokens": len(prompt), "llama_cpp_path": "llama-cpp-python eval",
           "weights": args.weights or "native", "weight_bytes_per_token": bytes_per_token, "engines": {}}
    for name, d in rows.items():
        res["engines"][name] = {"decode": _summary(d["decode"], args.new_tokens),
                                "prefill": _summary(d["prefill"], len(prompt))}
        res["engines"][name]["decode"]["weight_gb_s"] = (
            bytes_per_token * res["engines"][name]["decode"]["median_tokens_per_s"] / 1e9)
    ours, theirs = res["engines"]["sparsedge"], res["engines"]["llama.cpp"]
    res["decode_ratio_median"] = ours["decode"]["median_tokens_per_s"] / theirs["decode"]["median_tokens_per_s"]
    res["decode_ratio_best"] = ours["decode"]["best_tokens_per_s"] / theirs["decode"]["best_tokens_per_s"]
    res["prefill_ratio_median"] = ours["prefill"]["median_tokens_per_s"] / theirs["prefill"]["median_tokens_per_s"]
    # greedy agreement from the same prompt
    _, _, a = _time_llama(eng, prompt, args.agree_tokens)
    _, _, b = _time_ours((session, True), prompt, args.agree_tokens)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    res["greedy_agreement"] = {"tokens": args.agree_tokens, "identical_prefix": same,
                               "same_position": sum(x == y for x, y in zip(a, b))}
    if args.ppl_text:
        from sparsedge.evaluate import perplexity, token_windows
        windows = token_windows(tok, read_text(args.ppl_text), args.ppl_tokens, args.seq_len)
        eng_ppl = LlamaCpp(str(path), threads, args.seq_len + 8, logits_all=True)
        res["perplexity"] = {"tokens": sum(len(w) - 1 for w in windows), "llama.cpp": _ppl_llama(eng_ppl, windows),
                             "sparsedge": perplexity(session, windows, progress=False)["ppl"]}
        res["perplexity"]["ratio"] = res["perplexity"]["sparsedge"] / res["perplexity"]["llama.cpp"]
        for name, sp in sparse_sessions.items():
            r = perplexity(sp, windows, progress=False)
            res["perplexity"][name] = r["ppl"]
            res["perplexity"][f"{name} vs sparsedge"] = r["ppl"] / res["perplexity"]["sparsedge"]
            res["engines"][name]["ffn_down_sparsity"] = r["ffn_down_sparsity"]
    for name in rows:
        if name != "llama.cpp":
            res["engines"][name]["decode_ratio_median"] = (res["engines"][name]["decode"]["median_tokens_per_s"]
                                                           / theirs["decode"]["median_tokens_per_s"])
    res["environment"] = environment("cpu")
    if args.png:
        plot(res, args.png)
    logger.info(f"decode sparsedge/llama.cpp = {res['decode_ratio_median']:.2f}x (median), prefill "
                f"{res['prefill_ratio_median']:.2f}x; greedy identical for {same}/{args.agree_tokens} tokens")
    return res


def plot(res: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, phase in zip(axes, ("decode", "prefill")):
        names = list(res["engines"])
        med = [res["engines"][n][phase]["median_tokens_per_s"] for n in names]
        best = [res["engines"][n][phase]["best_tokens_per_s"] for n in names]
        ax.bar(names, med, color=["#888"] + ["#2a7", "#7a2", "#27a", "#a72", "#a27"][: len(names) - 1], label="median")
        ax.tick_params(axis="x", labelsize=6, rotation=20)
        ax.scatter(names, best, color="k", zorder=3, s=12, label="best")
        ax.set_title(f"{phase} tok/s ({res['threads']} threads)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(res['model']).name}, same file", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
