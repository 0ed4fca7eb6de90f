"""Predictor construction (whitened SVD) and greedy threshold calibration on synthetic data."""
import pytest
import torch

from sparsedge.ffn import predictor as P


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
    bias, info = P.calibrate_thresholds(scores, c, target=1.0)
    assert info["stopped_by_guard"]
    assert info["all_off"] == int(0.01 * I)
    all_off = (((scores + bias) > 0).sum(0) == 0).sum().item()
    assert all_off <= int(0.01 * I)


def test_penalties_and_tau():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(1000, 50, generator=gen)
    u = torch.randn(1000, 50, generator=gen)
    from sparsedge.ops.ffn import activate
    tau = P.calibrate_tau(g, "silu", 0.0, 0.5)
    a = torch.nn.functional.silu(g).abs()
    assert abs((a < tau).float().mean().item() - 0.5) < 0.01
    assert P.calibrate_tau(g, "relu", 0.0, 0.5) == 0.0
    h = activate(g, u, "silu", 0.0, tau)
    wd = torch.randn(50, 16)
    for pen in P.PENALTIES:
        c = P.importance(h, g, wd, pen, "silu", 0.0, tau)
        assert c.shape == h.shape and (c >= 0).all() and (c[h == 0] == 0).all()
    with pytest.raises(ValueError):
        P.importance(h, g, wd, "nope", "silu", 0.0, tau)
