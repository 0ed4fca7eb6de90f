"""Predictor construction and threshold calibration (docs/methods.md §1), on plain tensors.

- `whitened_svd`: truncation-aware low-rank factorisation of W_gate in float64, P2 P1 ~ W_gate,
  minimising the error on real activations ||(W - P2 P1) X^T|| rather than ||W - P2 P1||.
- `calibrate_tau`: CATS-style per-layer activation threshold for silu/gelu models.
- `importance`: the per (token, neuron) penalty weights c (full / act / h / fisher).
- `calibrate_thresholds`: the greedy per-neuron heap that turns predicted scores into biases.
- `penalty_path`, `allocate_layer_targets`: the same heap one level up, spreading a model-wide sparsity
  over the layers where it costs least.
- `recall_stats`: measured recall and predicted / true sparsity for a layer.
"""
from __future__ import annotations

import heapq
import math

import torch
from loguru import logger

from sparsedge.activations import RELU_FAMILY, activate

PENALTIES = ("full", "act", "h", "fisher")



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
               act_param: float, tau: float, grad: torch.Tensor | None = None) -> torch.Tensor:
    """c[n, i] >= 0: full = |h| * ||W_down[:, i]||, act = |act(gate)|, h = |h|, fisher = |h * dL/dh|; zero
    where the true activation is zero (after tau), so "free" sparsity costs nothing.

    fisher needs `grad` [N, d] or [N, samples, d], gradients of the next-token loss with respect to this
    layer's FFN output (collect_loss_grads): dL/dh_i = grad . W_down[:, i], so c is the first-order loss
    change of skipping the pair (the root mean square over label samples), and summed c^2 is the Fisher
    (diagonal) estimate of the loss it adds.
    Unlike `full` it weighs the neurons of different layers, and the tokens of one neuron, by what the
    output actually needs from them."""
    if penalty == "full":
        c = h.float().abs() * w_down_t.float().norm(dim=1)[None, :]
    elif penalty == "h":
        c = h.float().abs()
    elif penalty == "act":
        c = act_values(g, activation, act_param).abs()
        c = torch.where(h == 0, torch.zeros_like(c), c)
    elif penalty == "fisher":
        if grad is not None and grad.dim() == 2:
            grad = grad[:, None, :]
        if grad is None or grad.dim() != 3 or grad.shape[0] != h.shape[0] or grad.shape[2] != w_down_t.shape[1]:
            raise ValueError(f"the fisher penalty needs the loss gradient of the FFN output, [{h.shape[0]}, "
                             f"{w_down_t.shape[1]}] or [{h.shape[0]}, samples, {w_down_t.shape[1]}], got "
                             f"{None if grad is None else tuple(grad.shape)}")
        # several label samples: c^2 is the mean of the per-sample squares (a less noisy Fisher estimate)
        wt = w_down_t.float().T
        c = sum((h.float() * (grad[:, k].float() @ wt)).square() for k in range(grad.shape[1]))
        c = (c / grad.shape[1]).sqrt()
    else:
        raise ValueError(f"unknown penalty {penalty!r} (choose from {', '.join(PENALTIES)})")
    return c


def true_active(h: torch.Tensor) -> torch.Tensor:
    return h != 0


def calibrate_thresholds(scores: torch.Tensor, c: torch.Tensor, target: float, n_points: int = 256,
                         free_cap: float = 0.95, guard: float = 0.01, hull: bool = True,
                         neuron_cap: float = 0.95) -> tuple[torch.Tensor, dict]:
    """Greedy per-neuron thresholds. scores, c: [N, I] on the threshold half. Returns (bias [I], info).

    For each neuron the tokens are sorted by predicted score; penalty(k) = cumulative sum of c^2 over the
    k lowest-predicted tokens, sampled at n_points quantile positions. Every neuron starts at its last
    zero-penalty quantile (capped at `free_cap`), then the neuron whose next step adds the least penalty
    advances (heap) until the mean predicted sparsity reaches `target`, or until one more step would switch
    more than `guard` of the neurons off entirely. bias_i = -(cut between the last cut token and the next).

    hull=True (default): a step goes to the next vertex of the neuron's lower convex hull of penalty(k), and
    the heap orders steps by penalty per quantile; on the hull the greedy is the exact Lagrangian optimum at
    every point it stops. hull=False steps one quantile at a time, as docs/methods.md words it; that greedy is
    myopic: one costly token in front of many cheap ones blocks a neuron for good, which noisy per-token
    penalties (fisher) make common. SmolLM2, q4 + fisher (docs/results/ffn.md): +2.35 / +3.02% at 44 / 47%
    sparsity with hull steps, +2.87 / +3.65% without.

    neuron_cap: no neuron advances past this fraction of the calibration tokens (its free start excepted).
    A neuron cut on 99% of them was judged on the 1% where it fired, and those firings are what matter on
    new text: SmolLM2's massive-activation neurons (peak contribution 1000-19000x their layer's median) were
    cut on 99% of tokens without the cap. With neuron_cap = 1 the guard bounds how many go entirely off.
    """
    heap = _GreedyHeap(scores, c, n_points, free_cap, guard, hull, neuron_cap)
    heap.advance_to(target)
    return heap.bias(), heap.info()


def penalty_path(scores: torch.Tensor, c: torch.Tensor, grid: list[float], n_points: int = 256,
                 free_cap: float = 0.95, guard: float = 0.01, hull: bool = True,
                 neuron_cap: float = 0.95) -> list[tuple[float, float]]:
    """The greedy heap of calibrate_thresholds run through the sparsity targets `grid` (ascending):
    [(calibrated sparsity, summed c^2 of the skipped pairs)] at each, what calibrate_thresholds(target=t)
    would reach. A layer's cost curve, for allocating a model-wide sparsity across layers
    (allocate_layer_targets); the guard ends it early (later points repeat the last)."""
    heap = _GreedyHeap(scores, c, n_points, free_cap, guard, hull, neuron_cap)
    out = []
    for t in grid:
        heap.advance_to(t)
        out.append((heap.sparsity, heap.penalty))
    return out


class _GreedyHeap:
    """State of the per-neuron greedy threshold heap (see calibrate_thresholds)."""

    def __init__(self, scores: torch.Tensor, c: torch.Tensor, n_points: int, free_cap: float, guard: float,
                 hull: bool = True, neuron_cap: float = 0.95):
        N, I = scores.shape
        self.N, self.I, self.n_points = N, I, n_points
        self.sorted_s, order = torch.sort(scores.float(), dim=0)
        pen = torch.cumsum(torch.gather(c.double() ** 2, 0, order), dim=0)  # pen[k-1] = penalty of cutting k
        pen = torch.cat([torch.zeros(1, I, dtype=torch.float64), pen], 0)  # pen[k], k = 0..N
        ks = torch.round(torch.linspace(0, N, n_points + 1, dtype=torch.float64)).long()  # quantile positions
        qpen = pen[ks]  # [n_points + 1, I]
        # start: last quantile with exactly zero penalty, capped at free_cap
        cap_j = int(math.floor(free_cap * n_points))
        zero = (qpen[: cap_j + 1] == 0)
        self.start = (zero.cumprod(0).sum(0) - 1).clamp_min(0).tolist()  # last j of the leading zero run
        self.pos = list(self.start)
        self.ks = ks.tolist()
        self.total_k = float(sum(self.ks[j] for j in self.pos))
        self.n_off = sum(1 for j in self.pos if j == n_points)
        self.max_off = int(math.floor(guard * I))
        self.qp = qpen.T.contiguous().tolist()  # per neuron list of penalties
        # the positions each neuron may stop at: every quantile, or only the vertices of its lower convex hull
        # (never past max_j: see calibrate_thresholds' neuron_cap)
        max_j = int(math.floor(neuron_cap * n_points))
        if hull:
            self.stops = [[j + a for a in _lower_hull([(k, q) for k, q in enumerate(self.qp[i][j:max_j + 1])])]
                          for i, j in enumerate(self.pos)]
        else:
            self.stops = [list(range(j, max(j, max_j) + 1)) for j in self.pos]
        self.at = [0] * I  # index into stops[i] of pos[i]
        self.heap = [(self._slope(i), i) for i in range(I) if len(self.stops[i]) > 1]
        heapq.heapify(self.heap)
        self.steps, self.stopped_by_guard = 0, False

    @property
    def sparsity(self) -> float:
        return self.total_k / (self.N * self.I)

    @property
    def penalty(self) -> float:
        """Summed c^2 of the skipped (token, neuron) pairs."""
        return float(sum(self.qp[i][j] for i, j in enumerate(self.pos)))

    def _slope(self, i: int) -> float:
        """Penalty per quantile step of neuron i's next move."""
        j, k = self.stops[i][self.at[i]], self.stops[i][self.at[i] + 1]
        return (self.qp[i][k] - self.qp[i][j]) / (k - j)

    def advance_to(self, target: float) -> None:
        goal, ks, pos, heap = target * self.N * self.I, self.ks, self.pos, self.heap
        while self.total_k < goal and heap and not self.stopped_by_guard:
            _, i = heap[0]
            j, k = pos[i], self.stops[i][self.at[i] + 1]
            if k == self.n_points:
                if self.n_off + 1 > self.max_off:
                    self.stopped_by_guard = True
                    break
                self.n_off += 1
            heapq.heappop(heap)
            pos[i] = k
            self.at[i] += 1
            self.total_k += ks[k] - ks[j]
            self.steps += 1
            if self.at[i] + 1 < len(self.stops[i]):
                heapq.heappush(heap, (self._slope(i), i))

    def bias(self) -> torch.Tensor:
        """-cut per neuron: tokens with score <= cut are predicted inactive; the cut lies halfway to the next."""
        N, sorted_s = self.N, self.sorted_s
        posk = torch.tensor([self.ks[j] for j in self.pos], dtype=torch.long)
        lo = sorted_s.gather(0, (posk - 1).clamp(0, N - 1)[None, :])[0]
        hi = sorted_s.gather(0, posk.clamp(0, N - 1)[None, :])[0]
        cut = 0.5 * (lo + hi)
        cut = torch.where(posk == 0, torch.full_like(cut, -1e30), cut)
        cut = torch.where(posk >= N, torch.full_like(cut, 1e30), cut)
        return (-cut).float()

    def info(self) -> dict:
        NI = self.N * self.I
        return {"steps": self.steps, "free_sparsity": float(sum(self.ks[j] for j in self.start)) / NI,
                "calib_sparsity": self.sparsity, "all_off": self.n_off, "stopped_by_guard": self.stopped_by_guard,
                "penalty": self.penalty}


def allocate_layer_targets(paths: list[list[tuple[float, float]]], grid: list[float], total: float) -> list[float]:
    """Per-layer sparsity targets (values of `grid`) whose mean reaches `total` at the least summed penalty.

    paths[l] is penalty_path(layer l) on `grid`. The penalties must be comparable across layers (the
    `fisher` penalty is: a first-order loss change, in loss units; `full` is in each layer's output units,
    which the residual stream does not weigh equally). Each layer's curve is reduced to its lower convex
    hull and the cheapest marginal steps (penalty per unit of sparsity) are taken across all layers until
    the mean calibrated sparsity reaches `total`: the greedy heap of calibrate_thresholds, one level up."""
    hulls = [_lower_hull(path) for path in paths]
    pos = [0] * len(paths)

    def slope(l):
        (s0, p0), (s1, p1) = paths[l][hulls[l][pos[l]]], paths[l][hulls[l][pos[l] + 1]]
        return (p1 - p0) / max(s1 - s0, 1e-12)

    heap = [(slope(l), l) for l in range(len(paths)) if len(hulls[l]) > 1]
    heapq.heapify(heap)
    mean = sum(paths[l][hulls[l][0]][0] for l in range(len(paths))) / max(1, len(paths))
    while mean < total and heap:
        _, l = heapq.heappop(heap)
        before = paths[l][hulls[l][pos[l]]][0]
        pos[l] += 1
        mean += (paths[l][hulls[l][pos[l]]][0] - before) / len(paths)
        if pos[l] + 1 < len(hulls[l]):
            heapq.heappush(heap, (slope(l), l))
    return [grid[hulls[l][pos[l]]] for l in range(len(paths))]


def _lower_hull(path: list[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of (sparsity, penalty) points, left to right (first point kept)."""
    hull: list[int] = []
    for j, (x, y) in enumerate(path):
        if hull and x <= path[hull[-1]][0]:  # no sparsity gained (e.g. free sparsity, or the guard): skip
            continue
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = path[hull[-2]], path[hull[-1]]
            if (y1 - y0) * (x - x0) >= (y - y0) * (x1 - x0):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


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
