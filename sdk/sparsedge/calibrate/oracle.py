"""How much FFN sparsity can any predictor buy on a SiLU/GELU model? Masks vs oracles, by perplexity.

    python -m sparsedge.calibrate.oracle --model smollm2-135m --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --sparsity 0.4 --methods oracle,gate,svd,svd-band,svd-product --rank 128 --json-out ffn_oracle.json \
        --plot ffn_oracle.png

Every method decides, per token and layer, which FFN neurons to skip (gate/up rows not computed, down rows
not read) at a per-layer target fraction (`--sparsity`, 0.1 less on layers 0 and 1 as docs/methods.md's
calibration does), fitted on calibration text (the second half of --text by default) and evaluated on the
first --eval-tokens tokens (disjoint). The FFN is run densely and the skipped neurons' h are zeroed, which
is exactly what a sparse kernel executing that decision computes.

  oracle       skip the neurons with the smallest true contribution |h_i| * ||W_down[:, i]|| (needs h:
               a bound no predictor can beat at equal sparsity)
  gate         skip where |act(g_i)| is smallest, with the exact gate pre-activation g (CATS-style; the
               bound for any predictor that estimates the gate alone, i.e. for SVD gate predictors)
  gate-band    the exact gate again, with per-neuron two-sided cuts (lo_i < g_i < hi_i is inactive): the
               bound for per-neuron-threshold gate predictors (tighter than `gate`'s one cut per layer)
  svd          the shipped predictor's decision rule: rank-r whitened SVD of W_gate, one cut per neuron
               from below (predicted active when the score is above it)
  svd-band     same scores, a two-sided cut: inactive when lo_i < score < hi_i (SiLU's near-zero band)
  svd-product  rank-r whitened SVD of [W_gate; W_up] (shared P1), score |act(g_hat) * u_hat| * ||W_down_i||

Per-neuron cuts are allocated by one Lagrange multiplier per layer (cost = summed squared true
contribution of the calibration tokens a cut skips), the continuous counterpart of the greedy heap.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from loguru import logger
from tqdm import tqdm

from sparsedge.activations import RELU_FAMILY
from sparsedge.calibrate import predictor as P

METHODS = ("oracle", "gate", "gate-band", "svd", "svd-band", "svd-product")


class MaskedFFN(torch.nn.Module):
    """A dense FFN whose h is zeroed where keep(x, g, h) is False; counts the skipped neurons."""

    def __init__(self, dense, keep):
        super().__init__()
        self.dense, self.keep = dense, keep
        self.skipped = self.total = 0

    def forward(self, x):
        g, h = self.dense.hidden(x)
        keep = self.keep(x, g, h)
        self.skipped += int((~keep).sum())
        self.total += keep.numel()
        return torch.ops.sparsedge.linear_t(h * keep.to(h.dtype), self.dense.w_down_t)


def band_thresholds(scores: torch.Tensor, cost: torch.Tensor, target: float, two_sided: bool,
                    n_points: int = 128, cap: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron cut (lo, hi): a token is predicted inactive when lo < score < hi. scores, cost [N, I].

    The tokens of each neuron are sorted by score and grouped into n_points quantile steps; a cut covers a
    contiguous run of steps (from the bottom when one-sided), its cost the sum of cost^2 it covers. Each
    neuron takes the width w maximising lam * w - min-cost(w), with lam bisected so the mean width meets
    `target`. lo = -inf for a cut from the bottom, hi = +inf for one that reaches the top."""
    N, I = scores.shape
    ss, order = torch.sort(scores.float(), 0)
    pen = torch.cat([torch.zeros(1, I, dtype=torch.float64),
                     torch.cumsum(torch.gather(cost.double() ** 2, 0, order), 0)])
    ks = torch.round(torch.linspace(0, N, n_points + 1, dtype=torch.float64)).long()
    qp = pen[ks]  # [n_points + 1, I]
    wmax = int(cap * n_points)
    best = torch.zeros(wmax + 1, I, dtype=torch.float64)
    start = torch.zeros(wmax + 1, I, dtype=torch.long)
    for w in range(1, wmax + 1):
        d = qp[w:] - qp[:-w]  # cost of the run a..a+w
        if two_sided:
            best[w], start[w] = d.min(0)
        else:
            best[w] = d[0]
    frac = torch.arange(wmax + 1, dtype=torch.float64) / n_points

    def pick(lam):
        return (best - lam * frac[:, None]).argmin(0)

    lo_l, hi_l = 0.0, float(best.max()) * 4 * n_points + 1.0
    for _ in range(60):
        mid = 0.5 * (lo_l + hi_l)
        if float(frac[pick(mid)].mean()) >= target:
            hi_l = mid
        else:
            lo_l = mid
    width = pick(hi_l)
    a = start[width, torch.arange(I)]
    b = a + width

    def cut(j):  # halfway between the last token inside and the first outside
        k = ks[j]
        below = ss.gather(0, (k - 1).clamp(0, N - 1)[None])[0]
        above = ss.gather(0, k.clamp(0, N - 1)[None])[0]
        return 0.5 * (below + above), k

    lo, ka = cut(a)
    hi, kb = cut(b)
    lo = torch.where(ka == 0, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(kb >= N, torch.full_like(hi, math.inf), hi)
    hi = torch.where(width == 0, lo, hi)  # empty cut: lo < s < lo never holds
    return lo, hi


class LayerFit:
    """One layer's calibration inputs (x_a: SVD half, x_b: cut half) and its whitened-SVD factors, computed
    once per kind (gate, or gate+up) and shared by every method and target fitted on the layer."""

    def __init__(self, dense, x_a: torch.Tensor, x_b: torch.Tensor, rank: int):
        self.dense, self.x_a, self.x_b, self.rank = dense, x_a, x_b, rank
        self._factors: dict = {}

    def factors(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if kind not in self._factors:
            d = self.dense
            w = d.w_gate.float() if kind == "gate" else torch.cat([d.w_gate.float(), d.w_up.float()])
            self._factors[kind] = P.whitened_svd(w, self.x_a.double().T @ self.x_a.double(), self.rank)
        return self._factors[kind]

    def keep(self, method: str, target: float):
        """keep(x, g, h) -> bool [T, I]: the method's skip decision at `target`, fitted on x_b."""
        dense, x_b = self.dense, self.x_b
        act, ap = dense.activation, float(dense.act_param)
        w_norm = dense.w_down_t.float().norm(dim=1)
        g_b, h_b = dense.hidden(x_b.to(dense.w_down_t.dtype))
        g_b, h_b = g_b.float(), h_b.float()
        contrib = h_b.abs() * w_norm

        def quantile(v):
            v = v.flatten()
            v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
            return float(torch.quantile(v, target)) if target > 0 else -math.inf

        if method == "oracle":
            thr = quantile(contrib)
            return lambda x, g, h: (h.float().abs() * w_norm) >= thr
        if method == "gate":
            thr = quantile(P.act_values(g_b, act, ap).abs())
            return lambda x, g, h: P.act_values(g.float(), act, ap).abs() >= thr
        if method == "gate-band":
            lo, hi = band_thresholds(g_b, contrib, target, two_sided=True)
            return lambda x, g, h: ~((g.float() > lo) & (g.float() < hi))
        if method in ("svd", "svd-band"):
            p1, p2 = self.factors("gate")
            lo, hi = band_thresholds(P.scores_of(x_b, p1, p2), contrib, target, method == "svd-band")

            def keep(x, g, h):
                s = P.scores_of(x.float(), p1, p2)
                return ~((s > lo) & (s < hi))
            return keep
        if method == "svd-product":
            p1, p2 = self.factors("gate+up")
            I = dense.I

            def score(x):
                z = P.scores_of(x.float(), p1, p2)
                return (P.act_values(z[:, :I], act, ap) * z[:, I:]).abs() * w_norm

            _, hi = band_thresholds(score(x_b), contrib, target, two_sided=False)
            return lambda x, g, h: score(x) >= hi
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


def fit_layer(method: str, dense, x_a: torch.Tensor, x_b: torch.Tensor, target: float, rank: int):
    """keep(x, g, h) -> bool [T, I] for one layer and one method (see LayerFit to fit several)."""
    return LayerFit(dense, x_a, x_b, rank).keep(method, target)


def evaluate_masks(session, windows, keeps) -> tuple[float, float]:
    """(perplexity, skipped fraction) with layer i's FFN masked by keeps[i], through sparsedge.evaluate."""
    from sparsedge.evaluate import perplexity
    model = session.model
    dense = [layer.ffn for layer in model.layers]
    masked = [MaskedFFN(d, k) for d, k in zip(dense, keeps)]
    for layer, m in zip(model.layers, masked):
        layer.ffn = m
    try:
        ppl = perplexity(session, windows, progress=False)["ppl"]
    finally:
        for layer, d in zip(model.layers, dense):
            layer.ffn = d
    return ppl, sum(m.skipped for m in masked) / max(1, sum(m.total for m in masked))


def run(session, text_path, methods, sparsities, rank=None, calib_start=0.5, tokens=8192, eval_tokens=4096,
        seq_len=512, progress=True) -> dict:
    from sparsedge.calibrate.collect import collect_inputs
    from sparsedge.evaluate import read_text, token_windows
    model = session.model
    if model.config.activation in RELU_FAMILY:
        logger.warning(f"{model.config.activation} is relu-family: its exact zeros make the oracles trivial")
    cal = token_windows(session.tokenizer, read_text(text_path, calib_start), tokens, seq_len)
    ev = token_windows(session.tokenizer, read_text(text_path, 0.0), eval_tokens, seq_len)
    xa, xb = collect_inputs(model, cal, progress=progress)
    rank = rank or P.default_rank(model.config.intermediate_size)
    dense_ppl, _ = evaluate_masks(session, ev, [lambda x, g, h: torch.ones_like(h, dtype=torch.bool)] * len(xa))
    fits = [LayerFit(layer.ffn, xa[i], xb[i], rank) for i, layer in enumerate(model.layers)]
    rows = []
    jobs = [(m, p) for m in methods for p in sparsities]
    for method, p in tqdm(jobs, desc="oracle masks", unit="setting", disable=not progress):
        t0 = time.perf_counter()
        keeps = [f.keep(method, max(0.0, p - (0.1 if i < 2 else 0.0))) for i, f in enumerate(fits)]
        ppl, skipped = evaluate_masks(session, ev, keeps)
        rows.append({"method": method, "target": p, "rank": rank if method.startswith("svd") else None,
                     "ppl": ppl, "ppl_increase_pct": 100 * (ppl / dense_ppl - 1), "skipped": skipped,
                     "seconds": time.perf_counter() - t0})
        logger.info(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}))
    return {"dense_ppl": dense_ppl, "rows": rows, "calib_tokens": sum(len(w) for w in cal),
            "eval_tokens": sum(len(w) for w in ev), "text": str(text_path), "calib_start": calib_start}


def plot(rows: list[dict], path, title: str = "") -> None:
    """Perplexity increase vs skipped fraction, one line per method (and rank)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    keys = sorted({(r["method"], r["rank"]) for r in rows}, key=lambda k: (METHODS.index(k[0]), k[1] or 0))
    for method, rank in keys:
        pts = sorted((100 * r["skipped"], r["ppl_increase_pct"]) for r in rows
                     if r["method"] == method and r["rank"] == rank)
        ax.plot(*zip(*pts), "o-", label=method + (f" (rank {rank})" if rank else ""))
    ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=-0.2)
    ax.set_xlabel("FFN neurons skipped per token (%)")
    ax.set_ylabel("perplexity increase vs dense (%)")
    ax.set_title(title or "FFN sparsity bounds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from sparsedge.session import Session
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", required=True)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sparsity", default="0.4", help="comma-separated per-layer skip fractions")
    p.add_argument("--rank", type=int, default=None, help="predictor rank (default: 2%% of I, at least 32)")
    p.add_argument("--calib-start", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json-out", default=None)
    p.add_argument("--plot", default=None, help="PNG of perplexity increase vs skipped fraction")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)} (choose from {', '.join(METHODS)})")
    logger.enable("sparsedge")
    s = Session.load(args.model, backend="cpu", progress=False)
    res = run(s, args.text, methods, [float(x) for x in args.sparsity.split(",") if x], args.rank,
              args.calib_start, args.tokens, args.eval_tokens, args.seq_len)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res["rows"], args.plot, f"{Path(str(args.model)).name}: FFN sparsity bounds")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
