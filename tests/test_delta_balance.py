"""Query/key channel balancing (sparsedge.delta.balance): the fold is exact, scales are validated, and
balanced thresholds give less attention-output error than one theta per head at equal sparsity."""
from __future__ import annotations

import pytest

from sparsedge.artifact import weights_fingerprint
import torch

from sparsedge.delta.balance import folded_key_scale

from sparsedge.generate import prefill

import sparsedge.backends.cpu  # noqa: F401
from sparsedge import Session
from sparsedge.delta import DeltaConfig
from sparsedge.calibrate import balance as cbal
from sparsedge.delta import balance
from sparsedge.calibrate import delta as dcal
from sparsedge.delta.cache import DeltaLayerCache
from sparsedge.testing.synthetic import random_transformer, tiny_config
from sparsedge.kv_cache import KVCache

from .conftest import greedy_decode


def random_scale(L, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-3, 4, (L, H, D // 2), generator=g).float()
    return torch.exp2(torch.cat([e, e], -1))


def logits_of(model, ids):
    cache = KVCache.dense(model.config, len(ids), model.dtype, model.device)
    model.ensure_rope(len(ids))
    with torch.inference_mode():
        return prefill(model, ids, cache, all_logits=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fold_is_exact_and_reversible(dtype, qkv_bias):
    cfg = tiny_config(activation="silu", qkv_bias=qkv_bias)
    model = random_transformer(cfg, dtype=dtype)
    if qkv_bias:  # make the bias non-trivial
        for layer in model.layers:
            layer.attention.bqkv.copy_(torch.randn(layer.attention.bqkv.shape).to(dtype))
    ids = torch.randint(3, cfg.vocab_size, (40,)).tolist()
    w0 = [layer.attention.wqkv.clone() for layer in model.layers]
    fp0 = weights_fingerprint(model)
    ref = logits_of(model, ids)
    ks = random_scale(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    balance.fold_key_scale(model, ks)
    assert not torch.equal(model.layers[0].attention.wqkv, w0[0])  # the weights did change
    assert torch.equal(logits_of(model, ids), ref)  # ... and the model did not, bit for bit
    assert weights_fingerprint(model) == fp0
    balance.fold_key_scale(model, random_scale(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, seed=1))
    assert torch.equal(logits_of(model, ids), ref)
    balance.fold_key_scale(model, None)
    assert all(torch.equal(layer.attention.wqkv, w) for layer, w in zip(model.layers, w0))
    assert folded_key_scale(model) is None and weights_fingerprint(model) == fp0


def test_invalid_scales_are_refused():
    L, H, D = 3, 2, 16
    good = random_scale(L, H, D)
    balance.check_key_scale(good, L, H, D)
    with pytest.raises(ValueError, match="shape"):
        balance.check_key_scale(good[:2], L, H, D)
    with pytest.raises(ValueError, match="powers of two"):
        balance.check_key_scale(good * 1.5, L, H, D)
    bad = good.clone()
    bad[0, 0, 0] *= 2
    with pytest.raises(ValueError, match="RoPE"):
        balance.check_key_scale(bad, L, H, D)
    with pytest.raises(ValueError, match="> 0"):
        balance.check_key_scale(-good, L, H, D)
    cfg = tiny_config()
    with pytest.raises(ValueError, match="shape"):
        DeltaConfig.resolve({"theta": 0.5, "key_scale": random_scale(3, 2, 8)}, cfg)  # tiny head_dim is 16
    DeltaConfig.resolve({"theta": 0.5, "key_scale": random_scale(3, 2, cfg.head_dim)}, cfg)


def synthetic_captures(T=160, H=1, G=2, D=16, seed=0):
    """One layer, one window: keys a random walk, queries with a 16x spread of channel magnitudes."""
    g = torch.Generator().manual_seed(seed)
    k = torch.cumsum(0.5 * torch.randn(T, H, D, generator=g), 0)
    mag = torch.exp2(torch.linspace(0, 4, D // 2))
    q = torch.randn(T, H * G, D, generator=g) * torch.cat([mag, mag]) / 8
    v = torch.randn(T, H, D, generator=g)
    dense = DeltaLayerCache(H, D, T, torch.float32, "cpu", 0.0, 8, 2, initial_density=1.0).attend(q, k, v, 0)
    return [[(q, k, v, dense.float())]]


def test_scales_follow_the_query_magnitude():
    per_layer = synthetic_captures()
    ks = cbal.key_scales_from_captures(per_layer, n_heads=2, n_kv_heads=1)
    assert ks.shape == (1, 1, 16)
    balance.check_key_scale(ks, 1, 1, 16)
    e = torch.log2(ks[0, 0, :8])
    assert e[-1] - e[0] >= 3  # 16x more query magnitude -> about 2^4 larger scale
    assert (e[1:] >= e[:-1]).all()


def test_balanced_thresholds_cut_error_at_equal_sparsity():
    per_layer = synthetic_captures()
    grid = [0.05 * i for i in range(1, 60)]
    errs = {}
    for name, pl in (("plain", per_layer),
                     ("balanced", cbal.scale_captures(
                         per_layer, cbal.key_scales_from_captures(per_layer, 2, 1), 2))):
        _, info = dcal.calibrate_layers(pl, 2, torch.float32, "sparsity", 0.0, 0.6, False, 8, 2, grid=grid)
        assert info["sparsity_mean"] >= 0.6 - 1e-6
        errs[name] = info["error_mean"]
    assert errs["balanced"] < 0.7 * errs["plain"], errs


def test_session_folds_and_unfolds_with_its_delta_config():
    cfg = tiny_config(activation="silu")
    model = random_transformer(cfg)
    ids = torch.randint(3, cfg.vocab_size, (24,)).tolist()
    model.ensure_rope(64)
    dense_tokens, _ = greedy_decode(model, KVCache.dense(cfg, 64, model.dtype, model.device), ids, 12)
    w0 = model.layers[1].attention.wqkv.clone()
    ks = random_scale(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    s = Session(model, None, None, 64, delta=DeltaConfig.resolve({"theta": 0.0, "key_scale": ks}, cfg))
    assert folded_key_scale(model) is not None and torch.equal(folded_key_scale(model), ks)
    # theta 0 on balanced keys is still dense attention: same greedy tokens
    tokens, _ = greedy_decode(model, s.new_cache(), ids, 12)
    assert tokens == dense_tokens
    s.set_delta(DeltaConfig.resolve(0.5, cfg))  # a config without a key scale unfolds it
    assert folded_key_scale(model) is None and torch.equal(model.layers[1].attention.wqkv, w0)
    s.set_delta(None)
    assert folded_key_scale(model) is None
