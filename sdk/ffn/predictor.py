"""Predictor construction and threshold calibration (METHODS.md section 1), on plain tensors.

- `whitened_svd`: truncation-aware low-rank factorisation of W_gate in float64, P2 P1 ~ W_gate,
  minimising the error on real activations ||(W - P2 P1) X^T|| rather than ||W - P2 P1||.
- `calibrate_tau`: CATS-style per-layer activation threshold for silu/gelu models.
- `importance`: the per (token, neuron) penalty weights c (full / act / h).
- `calibrate_thresholds`: the greedy per-neuron heap that turns predicted scores into biases.
- `recall_stats`: measured recall and predicted / true sparsity for a layer.
"""
from __future__ import annotations

import heapq
import math

import torch
from loguru import logger

from ..ops.ffn import activate

PENALTIES = ("full", "act", "h")
RELU_FAMILY = ("relu", "fatrelu", "drelu", "relu2")


def default_rank(intermediate_size: int, floor: int = 32, fraction: float = 0.02) -> int:
    """~2% of I (the paper's plateau: 256 for I = 11008), at least `floor`."""
    return int(min(intermediate_size, max(floor, round(fraction * intermediate_size))))


def cholesky_jitter(a: torch.Tensor, rel_eps: float = 1e-6, tries: int = 12) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of a symmetric PSD matrix; adds eps * mean(diag) * I, growing 10x per
    failure, when the matrix is singular. Returns (L, eps used)."""
    a = a.to(torch.float64)
    n = a.shape[0]
    scale = float(a.diagonal().abs().mean()) or 1.0
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    eps = rel_eps * scale
    for attempt in range(tries):
        L, info = torch.linalg.cholesky_ex(a + eps * eye)
        if int(info) == 0 and torch.isfinite(L).all():
            if attempt:
                logger.debug(f"cholesky needed jitter {eps:.3g} ({attempt} retries)")
            return L, eps
        eps *= 10.0
    raise RuntimeError(f"Cholesky failed even with jitter {eps:.3g}: the calibration activations are degenerate")


def whitened_svd(w_gate: torch.Tensor, xtx: torch.Tensor | None, rank: int,
                 whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """P1 [r, d], P2 [I, r] (float32) with P2 P1 ~ W_gate [I, d].

    whiten=True: S = chol(X^T X + eps I); U S V^T = svd(W S); P1 = V_r^T S^-1; P2 = U_r Sigma_r.
    whiten=False: plain SVD of W (the "naive SVD" ablation)."""
    w = w_gate.detach().to(torch.float64).cpu()
    r = int(min(rank, *w.shape))
    if not whiten:
        U, sig, Vh = torch.linalg.svd(w, full_matrices=False)
        return Vh[:r].float(), (U[:, :r] * sig[:r]).float()
    if xtx is None:
        raise ValueError("whitened SVD needs X^T X")
    S, _ = cholesky_jitter(xtx)
    U, sig, Vh = torch.linalg.svd(w @ S, full_matrices=False)
    # P1 = Vh_r S^-1  <=>  S^T P1^T = Vh_r^T  (S^T upper triangular)
    p1 = torch.linalg.solve_triangular(S.T, Vh[:r].T, upper=True).T
    return p1.float(), (U[:, :r] * sig[:r]).float()


def activation_error(w_gate: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, x: torch.Tensor) -> float:
    """Relative activation-weighted error ||(W - P2 P1) X^T||_F / ||W X^T||_F."""
    x = x.double()
    ref = x @ w_gate.double().T
    approx = (x @ p1.double().T) @ p2.double().T
    return float((ref - approx).norm() / ref.norm().clamp_min(1e-30))


def act_values(g: torch.Tensor, activation: str, act_param: float) -> torch.Tensor:
    """act(g) for the gate (drelu: relu(g)) in fp32."""
    return activate(g.float(), torch.ones_like(g, dtype=torch.float32), activation if activation != "drelu" else "relu",
                    act_param, 0.0)


def calibrate_tau(g: torch.Tensor, activation: str, act_param: float, target: float) -> float:
    """Per-layer tau such that a fraction `target` of |act(g)| lies below it (0 for relu-family)."""
    if activation in RELU_FAMILY or target <= 0:
        return 0.0
    a = act_values(g, activation, act_param).abs().reshape(-1)
    if a.numel() > 4_000_000:  # kthvalue on a uniform subsample is plenty for one scalar
        a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[:4_000_000]]
    k = max(1, min(a.numel(), int(round(target * a.numel()))))
    return float(torch.kthvalue(a, k).values)


def importance(h: torch.Tensor, g: torch.Tensor, w_down_t: torch.Tensor, penalty: str, activation: str,
               act_param: float, tau: float) -> torch.Tensor:
    """c[n, i] >= 0: full = |h| * ||W_down[:, i]||, act = |act(g)|, h = |h|; zero where the true
    activation is zero (after tau), so "free" sparsity costs nothing."""
    if penalty == "full":
        c = h.float().abs() * w_down_t.float().norm(dim=1)[None, :]
    elif penalty == "h":
        c = h.float().abs()
    elif penalty == "act":
        c = act_values(g, activation, act_param).abs()
        c = torch.where(h == 0, torch.zeros_like(c), c)
    else:
        raise ValueError(f"unknown penalty {penalty!r} (choose from {', '.join(PENALTIES)})")
    return c


def true_active(h: torch.Tensor) -> torch.Tensor:
    return h != 0


def calibrate_thresholds(scores: torch.Tensor, c: torch.Tensor, target: float, n_points: int = 256,
                         free_cap: float = 0.95, guard: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Greedy per-neuron thresholds. scores, c: [N, I] on the threshold half. Returns (bias [I], info).

    For each neuron the tokens are sorted by predicted score; penalty(k) = cumulative sum of c^2 over the
    k lowest-predicted tokens, sampled at n_points quantile positions. Every neuron starts at its last
    zero-penalty quantile (capped at `free_cap`), then the neuron whose next step adds the least penalty
    advances (heap) until the mean predicted sparsity reaches `target`, or until one more step would switch
    more than `guard` of the neurons off entirely. bias_i = -(cut between the last cut token and the next).
    """
    N, I = scores.shape
    sorted_s, order = torch.sort(scores.float(), dim=0)
    pen = torch.cumsum(torch.gather(c.double() ** 2, 0, order), dim=0)  # pen[k-1] = penalty of cutting k
    pen = torch.cat([torch.zeros(1, I, dtype=torch.float64), pen], 0)  # pen[k], k = 0..N
    ks = torch.round(torch.linspace(0, N, n_points + 1, dtype=torch.float64)).long()  # quantile positions
    qpen = pen[ks]  # [n_points + 1, I]
    # start: last quantile with exactly zero penalty, capped at free_cap
    cap_j = int(math.floor(free_cap * n_points))
    zero = (qpen[: cap_j + 1] == 0)
    start = (zero.cumprod(0).sum(0) - 1).clamp_min(0)  # last j of the leading zero run
    pos = start.tolist()
    ksl = ks.tolist()
    total_k = float(sum(ksl[j] for j in pos))
    goal = target * N * I
    n_off = sum(1 for j in pos if j == n_points)
    max_off = int(math.floor(guard * I))
    qp = qpen.T.contiguous().tolist()  # per neuron list of penalties
    heap = [(qp[i][j + 1] - qp[i][j], i) for i, j in enumerate(pos) if j < n_points]
    heapq.heapify(heap)
    steps, stopped_by_guard = 0, False
    while total_k < goal and heap:
        inc, i = heapq.heappop(heap)
        j = pos[i]
        if j + 1 == n_points:
            if n_off + 1 > max_off:
                stopped_by_guard = True
                break
            n_off += 1
        pos[i] = j + 1
        total_k += ksl[j + 1] - ksl[j]
        steps += 1
        if j + 1 < n_points:
            heapq.heappush(heap, (qp[i][j + 2] - qp[i][j + 1], i))
    # cut values: tokens with score <= cut are predicted inactive; cut halfway to the next token
    posk = torch.tensor([ksl[j] for j in pos], dtype=torch.long)
    lo = sorted_s.gather(0, (posk - 1).clamp(0, N - 1)[None, :])[0]
    hi = sorted_s.gather(0, posk.clamp(0, N - 1)[None, :])[0]
    cut = 0.5 * (lo + hi)
    cut = torch.where(posk == 0, torch.full_like(cut, -1e30), cut)
    cut = torch.where(posk >= N, torch.full_like(cut, 1e30), cut)
    bias = -cut
    info = {"steps": steps, "free_sparsity": float(sum(ksl[j] for j in start.tolist())) / (N * I),
            "calib_sparsity": total_k / (N * I), "all_off": n_off, "stopped_by_guard": stopped_by_guard,
            "penalty": float(sum(qp[i][pos[i]] for i in range(I)))}
    return bias.float(), info


def recall_stats(pred_active: torch.Tensor, true_act: torch.Tensor, c: torch.Tensor | None = None) -> dict:
    """Recall of truly active (token, neuron) pairs, predicted / true sparsity, and the share of
    importance mass (sum c^2) the predictor keeps."""
    tp = (pred_active & true_act).sum().item()
    n_true = true_act.sum().item()
    out = {"recall": tp / n_true if n_true else 1.0,
           "predicted_sparsity": 1.0 - pred_active.float().mean().item(),
           "true_sparsity": 1.0 - true_act.float().mean().item()}
    if c is not None:
        c2 = c.double() ** 2
        tot = c2.sum().item()
        out["weighted_recall"] = (c2 * pred_active).sum().item() / tot if tot else 1.0
    return out


def scores_of(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    return (x.float() @ p1.float().T) @ p2.float().T
