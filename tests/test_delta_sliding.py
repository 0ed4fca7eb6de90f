"""Delta attention on a model with interleaved sliding-window and global layers (Gemma 3, Qwen2/3 with
max_window_layers): delta caches on the global layers, the exact window cache on the sliding ones, and the
calibration capture running each layer with its own cache."""
from __future__ import annotations

import pytest
import torch

import sparsedge.backends.cpu  # noqa: F401
from sparsedge.calibrate import delta as dcal
from sparsedge.delta import DeltaConfig
from sparsedge.delta.cache import DeltaLayerCache
from sparsedge.kv_cache import KVCache, SlidingLayerCache, layer_cache
from sparsedge.testing.synthetic import random_transformer, tiny_config

from .conftest import greedy_decode

WINDOW = 8


def _model():
    # layers 0 and 2 slide over 8 positions, layer 1 and 3 attend to everything; prompts run past the window
    cfg = tiny_config(activation="silu", n_layers=4, sliding_window=WINDOW, sliding_layers=[0, 2])
    model = random_transformer(cfg)
    model.ensure_rope(cfg.max_seq_len)
    return cfg, model


def test_delta_runs_on_global_layers_and_window_cache_on_sliding():
    cfg, _ = _model()
    cache = DeltaConfig.resolve(0.5, cfg).make_cache(cfg, 64, torch.float32, "cpu")
    kinds = [type(c) for c in cache.layers]
    assert kinds == [SlidingLayerCache, DeltaLayerCache, SlidingLayerCache, DeltaLayerCache]
    assert [c.window for c in cache.layers[::2]] == [WINDOW, WINDOW]


def test_theta_zero_greedy_equals_dense_past_the_window():
    cfg, model = _model()
    ids = list(range(3, 40))  # 37 prompt positions, then 16 decode steps: far past the 8-position window
    dense, ld = greedy_decode(model, KVCache.dense(cfg, 64, torch.float32, "cpu"), ids, 16)
    got, lg = greedy_decode(model, DeltaConfig.resolve({"theta": 0.0, "window": 4, "sinks": 2}, cfg)
                            .make_cache(cfg, 64, torch.float32, "cpu"), ids, 16)
    assert got == dense
    torch.testing.assert_close(lg, ld, atol=1e-3, rtol=1e-3)
    # a large theta changes the global layers' attention: the test above could fail
    _, lb = greedy_decode(model, DeltaConfig.resolve({"theta": 50.0, "window": 4, "sinks": 2}, cfg)
                          .make_cache(cfg, 64, torch.float32, "cpu"), ids, 16)
    assert (lb - ld).abs().max() > 1e-3


class _Record:
    def __init__(self, inner, store):
        self.inner, self.store = inner, store

    def attend(self, q, k, v, start):
        out = self.inner.attend(q, k, v, start)
        self.store.append(out.float().clone())
        return out


def test_capture_runs_sliding_layers_with_their_window():
    """The global layer after a sliding one must see the model's real input: the capture's dense output of
    layer 3 equals a plain windowed forward's (it would not if layer 2 attended to everything)."""
    cfg, model = _model()
    ids = list(range(3, 35))
    assert dcal.delta_layers(cfg) == [1, 3]
    per_layer = dcal.capture(model, [ids])
    assert [len(p) for p in per_layer] == [0, 1, 0, 1]
    want: list = []
    layers = [layer_cache(cfg, i, len(ids), torch.float32, "cpu") for i in range(cfg.n_layers)]
    layers[3] = _Record(layers[3], want)
    with torch.inference_mode():
        model(torch.tensor(ids), 0, KVCache(layers, len(ids)))
    torch.testing.assert_close(per_layer[3][0][3], want[0], atol=0, rtol=0)


def test_key_scales_leave_sliding_layers_alone():
    cfg, model = _model()
    per_layer = dcal.capture(model, [list(range(3, 35))])
    from sparsedge.calibrate.balance import key_scales_from_captures
    ks = key_scales_from_captures(per_layer, cfg.n_heads, cfg.n_kv_heads)
    assert ks.shape == (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    assert (ks[0] == 1).all() and (ks[2] == 1).all()


def test_all_sliding_model_is_refused():
    cfg = tiny_config(activation="silu", sliding_window=WINDOW, sliding_layers=[0, 1, 2])
    with pytest.raises(ValueError, match="delta attention runs on global layers only"):
        DeltaConfig.resolve(0.5, cfg).make_cache(cfg, 64, torch.float32, "cpu")
