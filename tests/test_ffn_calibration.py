"""Predictor construction (whitened SVD) and greedy threshold calibration on synthetic data."""
import pytest
import torch

from sparsedge.calibrate import predictor as P


def _anisotropic_x(n, d, gen):
    scales = torch.logspace(1, -2, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    return (torch.randn(n, d, dtype=torch.float64, generator=gen) * scales) @ q.T


def test_whitened_beats_plain_svd_on_activation_error():
    gen = torch.Generator().manual_seed(0)
    d, I, r = 48, 160, 8
    x = _anisotropic_x(4000, d, gen)
    w = torch.randn(I, d, dtype=torch.float64, generator=gen)
    xtx = x[:2000].T @ x[:2000]
    p1w, p2w = P.whitened_svd(w, xtx, r, whiten=True)
    p1n, p2n = P.whitened_svd(w, None, r, whiten=False)
    assert p1w.shape == (r, d) and p2w.shape == (I, r)
    ew = P.activation_error(w, p1w, p2w, x[2000:])
    en = P.activation_error(w, p1n, p2n, x[2000:])
    assert ew < 0.5 * en, (ew, en)
    # full rank reproduces W
    p1, p2 = P.whitened_svd(w, xtx, d)
    torch.testing.assert_close((p2.double() @ p1.double()), w, atol=1e-3, rtol=1e-3)


def test_cholesky_jitter_handles_singular():
    x = torch.randn(100, 3, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], 1)  # rank-deficient X^T X
    L, eps = P.cholesky_jitter(x.T @ x)
    assert torch.isfinite(L).all() and eps > 0
    L0, _ = P.cholesky_jitter(torch.zeros(4, 4, dtype=torch.float64))  # all-zero activations
    assert torch.isfinite(L0).all()


def test_default_rank():
    assert P.default_rank(11008) == 220 and P.default_rank(1536) == 32 and P.default_rank(16) == 16


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_thresholds_hit_target(target):
    gen = torch.Generator().manual_seed(1)
    N, I = 1024, 400
    g = torch.randn(N, I, generator=gen)
    scores = g + 0.3 * torch.randn(N, I, generator=gen)
    c = torch.relu(g) * (0.5 + torch.rand(I, generator=gen))  # relu-like: zero where truly inactive
    bias, info = P.calibrate_thresholds(scores, c, target)
    pred_sparsity = 1 - ((scores + bias) > 0).float().mean().item()
    assert info["calib_sparsity"] >= target or info["stopped_by_guard"]
    assert abs(info["calib_sparsity"] - target) < 0.02 or info["calib_sparsity"] == info["free_sparsity"]
    assert abs(pred_sparsity - info["calib_sparsity"]) < 2e-3
    assert info["all_off"] <= int(0.01 * I)
    # free sparsity: every neuron can at least cut its zero-penalty prefix, capped at 95%
    assert 0 < info["free_sparsity"] <= 0.95


def test_free_sparsity_and_exact_predictor():
    """A perfect predictor of a relu layer gets the true sparsity for free, with recall 1."""
    gen = torch.Generator().manual_seed(2)
    N, I = 1024, 64
    g = torch.randn(N, I, generator=gen) - 0.5
    c = torch.relu(g)
    bias, info = P.calibrate_thresholds(g, c, 0.0)
    pred = (g + bias) > 0
    rs = P.recall_stats(pred, c > 0, c)
    assert rs["recall"] > 0.97
    assert info["free_sparsity"] > 0.6 and info["penalty"] == 0.0


def test_guard_stops_switching_neurons_off():
    gen = torch.Generator().manual_seed(3)
    N, I = 512, 300
    scores = torch.randn(N, I, generator=gen)
    c = torch.rand(N, I, generator=gen)
    c[:, :30] *= 1e-6  # 10% of the neurons are nearly free to switch off entirely
    bias, info = P.calibrate_thresholds(scores, c, target=1.0, neuron_cap=1.0)
    assert info["stopped_by_guard"]
    assert info["all_off"] == int(0.01 * I)
    all_off = (((scores + bias) > 0).sum(0) == 0).sum().item()
    assert all_off <= int(0.01 * I)


def test_penalties_and_tau():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(1000, 50, generator=gen)
    u = torch.randn(1000, 50, generator=gen)
    from sparsedge.activations import activate
    tau = P.calibrate_tau(g, "silu", 0.0, 0.5)
    a = torch.nn.functional.silu(g).abs()
    assert abs((a < tau).float().mean().item() - 0.5) < 0.01
    assert P.calibrate_tau(g, "relu", 0.0, 0.5) == 0.0
    h = activate(g, u, "silu", 0.0, tau)
    wd = torch.randn(50, 16)
    grad = torch.randn(1000, 16, generator=gen)
    for pen in P.PENALTIES:
        c = P.importance(h, g, wd, pen, "silu", 0.0, tau, grad=grad)
        assert c.shape == h.shape and (c >= 0).all() and (c[h == 0] == 0).all()
    with pytest.raises(ValueError):
        P.importance(h, g, wd, "nope", "silu", 0.0, tau)
    # fisher: |h_i * dL/dh_i| with dL/dh = grad @ W_down^T (W_down^T stored as wd [I, d])
    c = P.importance(h, g, wd, "fisher", "silu", 0.0, tau, grad=grad)
    torch.testing.assert_close(c[7, 3], (h[7, 3] * (grad[7] @ wd[3])).abs())
    with pytest.raises(ValueError, match="loss gradient"):
        P.importance(h, g, wd, "fisher", "silu", 0.0, tau)


def test_penalty_path_passes_through_what_calibrate_thresholds_reaches():
    """Each point of the path is the heap state calibrate_thresholds(target=t) ends in: same sparsity, same
    penalty (global allocation picks targets off the path, then recalibrates each layer to its target)."""
    gen = torch.Generator().manual_seed(5)
    N, I = 512, 120
    g = torch.randn(N, I, generator=gen)
    scores = g + 0.5 * torch.randn(N, I, generator=gen)
    c = torch.relu(g) * (0.5 + torch.rand(I, generator=gen))
    grid = [0.0, 0.2, 0.45, 0.7]
    path = P.penalty_path(scores, c, grid, n_points=64)
    assert [sp for sp, _ in path] == sorted(sp for sp, _ in path)
    assert [pen for _, pen in path] == sorted(pen for _, pen in path)
    for t, (sp, pen) in zip(grid, path):
        _, info = P.calibrate_thresholds(scores, c, t, n_points=64)
        assert sp == pytest.approx(info["calib_sparsity"], abs=1e-12)
        assert pen == pytest.approx(info["penalty"], rel=1e-9, abs=1e-12)
        assert sp >= t


def test_allocation_spends_sparsity_where_it_is_cheap():
    """Quadratic costs a_l * s^2 are minimised, for a fixed mean, at s_l proportional to 1/a_l."""
    grid = [k / 100 for k in range(96)]
    a = [1.0, 2.0, 4.0, 8.0]
    paths = [[(s, al * s * s) for s in grid] for al in a]
    targets = P.allocate_layer_targets(paths, grid, 0.3)
    assert sum(targets) / len(a) == pytest.approx(0.3, abs=0.01)
    ideal = [0.3 * len(a) / al / sum(1 / x for x in a) for al in a]  # s_l = c / a_l with mean 0.3
    assert targets == pytest.approx(ideal, abs=0.02)
    # a free layer is used up to its cap first; a layer whose heap cannot go further (guard) stays put
    paths = [[(s, 0.0) for s in grid], [(s, s) for s in grid], [(min(s, 0.1), min(s, 0.1)) for s in grid]]
    targets = P.allocate_layer_targets(paths, grid, 0.4)
    assert targets[0] == grid[-1] and targets[2] <= 0.1
    assert (grid[-1] + targets[1] + min(targets[2], 0.1)) / 3 >= 0.4


def test_lower_hull_skips_points_above_the_chord():
    path = [(0.0, 0.0), (0.1, 5.0), (0.2, 1.0), (0.2, 1.0), (0.3, 2.0), (0.4, 10.0)]
    assert P._lower_hull(path) == [0, 2, 4, 5]


def test_hull_steps_get_past_one_costly_token():
    """Neurons whose lowest-scored token is costly but whose next hundreds are free: the one-quantile greedy
    never moves them and pays elsewhere; hull steps take the spike with the free run behind it."""
    gen = torch.Generator().manual_seed(6)
    N, I = 1024, 200
    scores = torch.randn(N, I, generator=gen)
    c = 0.1 + torch.rand(N, I, generator=gen)  # every token costs something
    order = scores.argsort(0)
    blocked = torch.arange(0, I, 2)
    c[order[0, blocked], blocked] = 3.0  # one costly token first...
    low = order[1:600][:, blocked]
    c[low, blocked.expand_as(low)] = 0.01  # ...then a long nearly free run
    _, hull = P.calibrate_thresholds(scores, c, 0.4, n_points=128, guard=1.0)
    _, step = P.calibrate_thresholds(scores, c, 0.4, n_points=128, guard=1.0, hull=False)
    assert hull["calib_sparsity"] == pytest.approx(step["calib_sparsity"], abs=0.01)
    assert hull["penalty"] < 0.5 * step["penalty"], (hull["penalty"], step["penalty"])


@pytest.mark.parametrize("hull", [True, False])
def test_neuron_cap_bounds_every_neurons_sparsity(hull):
    gen = torch.Generator().manual_seed(7)
    N, I = 1000, 100
    scores = torch.randn(N, I, generator=gen)
    c = torch.rand(N, I, generator=gen)
    c[:, :20] *= 1e-4  # cheap neurons the heap would otherwise cut almost entirely
    bias, info = P.calibrate_thresholds(scores, c, 0.6, n_points=100, neuron_cap=0.9, hull=hull)
    per_neuron = 1 - ((scores + bias) > 0).float().mean(0)
    assert per_neuron.max() <= 0.9 + 1e-6
    assert info["calib_sparsity"] >= 0.6 and info["all_off"] == 0
    _, free = P.calibrate_thresholds(scores, c, 0.6, n_points=100, neuron_cap=1.0, hull=hull)
    assert free["all_off"] > 0  # without the cap the cheap neurons go off entirely (up to the guard)
