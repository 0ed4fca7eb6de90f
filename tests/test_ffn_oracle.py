"""FFN sparsity bounds (sparsedge.calibrate.oracle): cut allocation, masks, and the end-to-end run."""
from __future__ import annotations

import math

import pytest
import torch

import sparsedge.backends.cpu  # noqa: F401
from sparsedge.calibrate import oracle
from sparsedge.testing.synthetic import random_transformer, tiny_config

from .conftest import need_data


def _cut_cost(scores, cost, lo, hi):
    off = (scores > lo) & (scores < hi)
    return float((cost.double() ** 2 * off).sum()), float(off.float().mean())


@pytest.mark.parametrize("two_sided", [False, True])
def test_band_thresholds_meet_the_target(two_sided):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2000, 64, generator=g)
    cost = torch.randn(2000, 64, generator=g).abs()
    lo, hi = oracle.band_thresholds(scores, cost, 0.4, two_sided)
    _, frac = _cut_cost(scores, cost, lo, hi)
    assert 0.4 <= frac <= 0.4 + 2 / 128
    if not two_sided:
        assert torch.isinf(lo).all() and (lo < 0).all()


def test_two_sided_cut_is_never_worse_and_finds_the_middle():
    """Cost concentrated at both ends (SiLU-like: the near-zero band is cheap): the band cut should cost far
    less than a cut from the bottom at equal sparsity."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4000, 32, generator=g)
    cost = scores.abs() * (1 + 0.1 * torch.rand(4000, 32, generator=g))
    c1, f1 = _cut_cost(scores, cost, *oracle.band_thresholds(scores, cost, 0.5, False))
    c2, f2 = _cut_cost(scores, cost, *oracle.band_thresholds(scores, cost, 0.5, True))
    assert f2 >= 0.5 and f1 >= 0.5
    assert c2 < 0.3 * c1


def test_masks_keep_all_at_zero_sparsity_and_reach_the_target():
    cfg = tiny_config(activation="silu")
    model = random_transformer(cfg)
    x = torch.randn(300, cfg.dim)
    dense = model.layers[0].ffn
    ref = dense(x)
    for method in oracle.METHODS:
        keep = oracle.fit_layer(method, dense, x[:150], x[150:], 0.0, rank=8)
        torch.testing.assert_close(oracle.MaskedFFN(dense, keep)(x), ref)
        keep = oracle.fit_layer(method, dense, x[:150], x[150:], 0.5, rank=8)
        m = oracle.MaskedFFN(dense, keep)
        m(x[150:])  # the calibration tokens themselves: the fitted fraction
        assert abs(m.skipped / m.total - 0.5) < 0.05, method


def test_run_on_stories260k_orders_the_bounds():
    """The true-contribution oracle beats the exact-gate bound, which beats the rank-limited predictors."""
    path = need_data("stories260K/stories260K.bin")
    text = need_data("tinystories/TinyStories-valid-sample.txt")
    from sparsedge import Session
    s = Session.load(path, backend="cpu", progress=False)
    res = oracle.run(s, text, ["oracle", "gate", "svd"], [0.5], rank=8, tokens=1024, eval_tokens=768,
                     seq_len=256, progress=False)
    by = {r["method"]: r for r in res["rows"]}
    assert all(math.isfinite(r["ppl"]) and abs(r["skipped"] - 0.5) < 0.1 for r in res["rows"])
    assert res["dense_ppl"] < by["oracle"]["ppl"] < by["gate"]["ppl"] <= by["svd"]["ppl"] * 1.02
