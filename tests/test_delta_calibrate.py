"""Delta threshold calibration: both modes on a tiny random model, and the CLI path end to end on
stories260K (artifact written through sparsedge.artifact, then loaded by Session.load(delta=DIR))."""
from __future__ import annotations

import argparse

import pytest
import torch

from sparsedge.delta.balance import folded_key_scale

import sparsedge.backends.cpu  # noqa: F401
from sparsedge.delta import DeltaConfig
from sparsedge.calibrate import delta as dcal
from sparsedge.testing.synthetic import random_transformer, tiny_config

from .conftest import need_data

GRID = [0.0, 0.1, 0.2, 0.4, 0.8, 1.6]


@pytest.fixture(scope="module")
def captured():
    cfg = tiny_config(activation="silu")
    model = random_transformer(cfg)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, cfg.vocab_size, (96,), generator=g).tolist() for _ in range(2)]
    return cfg, dcal.capture(model, windows)


@pytest.mark.parametrize("per_head", [False, True])
def test_error_mode_respects_budget(captured, per_head):
    cfg, per_layer = captured
    budget = 0.05
    theta, info = dcal.calibrate_layers(per_layer, cfg.n_heads // cfg.n_kv_heads, torch.float32, "error", budget,
                                        0.0, per_head, window=8, sinks=2, grid=GRID)
    assert theta.shape == (cfg.n_layers, cfg.n_kv_heads)
    # per head: every head group is within budget, so the layer is too
    assert all(e <= budget * 1.0001 for e in info["error_per_layer"])
    assert (theta >= 0).all()


@pytest.mark.parametrize("per_head", [False, True])
def test_sparsity_mode_reaches_target(captured, per_head):
    cfg, per_layer = captured
    theta, info = dcal.calibrate_layers(per_layer, cfg.n_heads // cfg.n_kv_heads, torch.float32, "sparsity", 0.0,
                                        0.5, per_head, window=8, sinks=2, grid=GRID)
    assert info["sparsity_mean"] >= 0.5 - 1e-6
    if not per_head:
        assert (theta == theta[:, :1]).all()


def test_theta_zero_measures_zero_error(captured):
    cfg, per_layer = captured
    m = dcal.measure(per_layer[0], 0.0, 8, 2, cfg.n_heads // cfg.n_kv_heads, torch.float32)
    assert m["err"] < 1e-4


def test_cli_run_on_stories260k(tmp_path):
    path = need_data("stories260K/stories260K.bin")
    text = need_data("tinystories/TinyStories-valid-sample.txt")
    p = argparse.ArgumentParser()
    for a in ("--model", "--out", "--text"):
        p.add_argument(a)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--text-start", type=float, default=0.5)
    dcal.add_arguments(p)
    args = p.parse_args(["--model", str(path), "--out", str(tmp_path / "art"), "--text", str(text),
                         "--delta-tokens", "256", "--target-sparsity", "0.5", "--window", "16", "--sinks", "2"])
    summary = dcal.run(args)
    assert summary["sparsity_mean"] >= 0.5 - 1e-6
    from sparsedge import Session
    s = Session.load(path, backend="cpu", progress=False, delta=tmp_path / "art")
    assert isinstance(s.delta, DeltaConfig) and s.delta.window == 16 and s.delta.sinks == 2
    assert summary["key_balance"] and s.delta.key_scale is not None  # balanced by default, folded on load
    assert folded_key_scale(s.model) is not None and torch.equal(folded_key_scale(s.model), s.delta.key_scale)
    r = s.generate([1], max_new_tokens=40)
    assert r.stats.attn_sparsity is not None and len(r.token_ids) > 0
