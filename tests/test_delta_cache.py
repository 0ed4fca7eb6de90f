"""Delta-buffer cache: dense equivalence (theta = 0, full window), reconstruction bound, chunked calls,
truncate, capacity growth, statistics, byte accounting, DeltaConfig.resolve, and Session integration."""
from __future__ import annotations

import pytest
import torch

import sparsedge.backends.cpu  # noqa: F401
from sparsedge.delta import DeltaConfig
from sparsedge.delta.cache import DeltaLayerCache
from sparsedge.testing.opcases import walk_keys
from sparsedge.testing.synthetic import random_transformer, tiny_config
from sparsedge.kv_cache import DenseLayerCache, KVCache

from .conftest import greedy_decode, need_data, smollm2_gguf


def _pair(Hq=8, H=2, D=64, T=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, Hq, D, generator=g), walk_keys(T, H, D, seed=seed), torch.randn(T, H, D, generator=g))


def _dense(q, k, v, chunks):
    from sparsedge.config import ModelConfig
    Hq, H, D = q.shape[1], k.shape[1], k.shape[2]
    cfg = ModelConfig(vocab_size=8, dim=Hq * D, n_layers=1, n_heads=Hq, n_kv_heads=H, intermediate_size=8)
    c = DenseLayerCache(cfg, q.shape[0], torch.float32, "cpu")
    return _run(c, q, k, v, chunks)


def _run(cache, q, k, v, chunks):
    outs, s = [], 0
    for T in chunks:
        outs.append(cache.attend(q[s:s + T], k[s:s + T], v[s:s + T], s))
        s += T
    return torch.cat(outs)


@pytest.mark.parametrize("chunks", [[96], [40, 1, 1, 30, 1, 23]])
def test_theta_zero_reproduces_dense_attention(chunks):
    """theta = 0, W = 0, no sinks: every non-window score is a prefix sum of deltas; agrees to 1e-4."""
    q, k, v = _pair()
    c = DeltaLayerCache(2, 64, 96, torch.float32, "cpu", 0.0, window=0, sinks=0)
    torch.testing.assert_close(_run(c, q, k, v, chunks), _dense(q, k, v, chunks), atol=1e-4, rtol=1e-4)


def test_full_window_reproduces_dense_attention_at_any_theta():
    q, k, v = _pair()
    c = DeltaLayerCache(2, 64, 96, torch.float32, "cpu", 5.0, window=96, sinks=4)
    chunks = [50, 1, 1, 44]
    torch.testing.assert_close(_run(c, q, k, v, chunks), _dense(q, k, v, chunks), atol=1e-5, rtol=1e-5)
    assert c.stats()["scored_delta_entries"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("theta", [0.05, 0.3, 1.0])
def test_reconstruction_error_at_most_theta(dtype, theta):
    """|k_j - k_hat_j| <= theta per element. fp32: up to float rounding (1e-5). bf16 cache: a sent channel is
    off by the bf16 rounding of its delta (<= 2^-9 |delta|), which the next token's delta then corrects."""
    q, k, v = _pair(T=200)
    k = k.to(dtype)
    c = DeltaLayerCache(2, 64, 200, dtype, "cpu", theta, window=8, sinks=2)
    _run(c, q.to(dtype), k, v.to(dtype), [120, 1, 1, 78])
    assert c.encoded == 200 - 8  # the window's keys are not encoded yet
    err = (c.reconstructed_keys() - k[: c.encoded].float().transpose(0, 1)).abs()
    if dtype == torch.float32:
        assert float(err.max()) <= theta + 1e-5
    else:
        bound = theta + 2.0 ** -8 * (k.float().abs().max() + theta)
        assert float(err.max()) <= float(bound)


def test_chunked_calls_equal_one_prefill():
    q, k, v = _pair(T=120)
    a = DeltaLayerCache(2, 64, 120, torch.float32, "cpu", 0.3, window=16, sinks=4)
    b = DeltaLayerCache(2, 64, 120, torch.float32, "cpu", 0.3, window=16, sinks=4)
    oa = _run(a, q, k, v, [120])
    ob = _run(b, q, k, v, [33, 1, 1, 1, 50, 1, 33])
    torch.testing.assert_close(oa, ob, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.ref, b.ref)


def test_capacity_grows_and_matches_a_large_buffer():
    from loguru import logger
    msgs = []
    logger.enable("sparsedge")
    hid = logger.add(lambda m: msgs.append(str(m)), level="INFO")
    try:
        q, k, v = _pair(T=200)
        small = DeltaLayerCache(2, 64, 200, torch.float32, "cpu", 0.0, window=8, sinks=2, initial_density=0.02,
                                growth=0.05)
        big = DeltaLayerCache(2, 64, 200, torch.float32, "cpu", 0.0, window=8, sinks=2, initial_density=1.0)
        cap0 = small.capacity
        o1 = _run(small, q, k, v, [150, 1, 1, 48])
        o2 = _run(big, q, k, v, [150, 1, 1, 48])
    finally:
        logger.remove(hid)
    assert small.capacity > cap0 and small.grow_events >= 1
    assert any("grows from" in m for m in msgs)
    assert small.capacity <= 200 * 64
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    assert torch.equal(small.offsets, big.offsets)


def test_truncate_reset_and_one_token_rollback():
    q, k, v = _pair(T=100)
    c = DeltaLayerCache(2, 64, 100, torch.float32, "cpu", 0.3, window=16, sinks=4)
    first = _run(c, q, k, v, [60, 1, 1])
    assert c.truncate(0) and c.length == 0 and c.k_bytes() == 0
    again = _run(c, q, k, v, [60, 1, 1])
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    # roll back one token (ring intact) and redo it: same output, same reference (to rounding)
    ref_before = c.ref.clone()
    assert c.truncate(61) and c.length == 61
    redo = c.attend(q[61:62], k[61:62], v[61:62], 61)
    torch.testing.assert_close(redo, first[61:62], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.ref, ref_before, atol=1e-5, rtol=0)
    # rolling back further than the ring still holds is refused (the Session then re-prefills)
    c.attend(q[62:80], k[62:80], v[62:80], 62)
    assert not c.truncate(50)
    assert c.truncate(80)  # no-op


def test_stats_definition_by_brute_force():
    q, k, v = _pair(T=70)
    S, W = 3, 10
    c = DeltaLayerCache(2, 64, 70, torch.float32, "cpu", 0.4, window=W, sinks=S)
    _run(c, q, k, v, [40, 1, 29])
    nnz = (c.offsets[:, 1:] - c.offsets[:, :-1]).sum(0)  # entries per token over heads
    scored = zero = 0
    for p in range(70):
        for j in range(S, p - W + 1):
            scored += 2 * 64
            zero += 2 * 64 - int(nnz[j])
    st = c.stats()
    assert st["scored_delta_entries"] == scored and st["zero_delta_entries"] == zero
    assert c.encoded == 70 - W and int(nnz[70 - W:].sum()) == 0  # deferred: the window is not encoded
    assert st["encoded_delta_entries"] == (70 - W) * 2 * 64
    assert st["encoded_zero_entries"] == (70 - W) * 2 * 64 - int(nnz.sum())
    c.reset_stats()
    assert c.stats()["scored_delta_entries"] == 0


def test_keys_are_encoded_when_they_leave_the_window():
    """Deferred encoding: after a prefill of n tokens exactly n - W keys are encoded, each decode step encodes
    the one key that leaves the window (from the ring), and the result equals encoding everything at once."""
    q, k, v = _pair(T=90)
    W = 16
    c = DeltaLayerCache(2, 64, 90, torch.float32, "cpu", 0.3, window=W, sinks=2)
    c.attend(q[:40], k[:40], v[:40], 0)
    assert c.encoded == 40 - W
    for p in range(40, 90):
        c.attend(q[p:p + 1], k[p:p + 1], v[p:p + 1], p)
        assert c.encoded == p + 1 - W
    full = DeltaLayerCache(2, 64, 90, torch.float32, "cpu", 0.3, window=0, sinks=2)
    full.attend(q, k, v, 0)  # W = 0: every key encoded at once
    n = c.encoded
    assert torch.equal(c.offsets[:, : n + 1], full.offsets[:, : n + 1])
    for h in range(2):
        e = int(c.offsets[h, n])
        assert torch.equal(c.values[h, :e], full.values[h, :e]) and torch.equal(c.chan[h, :e], full.chan[h, :e])
    # un-encoded positions hold empty ranges, and the K bytes count their keys once (in the ring)
    assert (c.offsets[:, n:] == c.offsets[:, n:n + 1]).all()
    assert c.k_bytes() < full.k_bytes() + W * 2 * 64 * 4


def test_fill_leaves_the_state_of_a_prefill():
    q, k, v = _pair(T=80)
    a = DeltaLayerCache(2, 64, 80, torch.float32, "cpu", 0.3, window=16, sinks=4)
    b = DeltaLayerCache(2, 64, 80, torch.float32, "cpu", 0.3, window=16, sinks=4)
    a.attend(q[:70], k[:70], v[:70], 0)
    b.fill(k[:70], v[:70])
    for name in ("offsets", "ref", "window_k", "sink_k", "v_cache"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.length, a.encoded) == (b.length, b.encoded) == (70, 54)
    torch.testing.assert_close(b.attend(q[70:71], k[70:71], v[70:71], 70), a.attend(q[70:71], k[70:71], v[70:71], 70),
                               atol=0, rtol=0)


def test_k_bytes_accounting():
    q, k, v = _pair(T=100)
    c = DeltaLayerCache(2, 64, 100, torch.float32, "cpu", 0.5, window=16, sinks=4)
    _run(c, q, k, v, [100])
    used = int(c.offsets[:, 100].sum())
    assert c.k_bytes() == used * 5 + 2 * 101 * 4 + 2 * 64 * 4 + (4 + 16) * 2 * 64 * 4
    assert c.dense_k_bytes() == 100 * 2 * 64 * 4
    assert c.k_capacity_bytes() >= c.k_bytes()


def test_delta_config_resolve_forms(tmp_path):
    cfg = tiny_config()  # 3 layers, 2 KV heads
    a = DeltaConfig.resolve(0.5, cfg)
    assert a.theta == [[0.5, 0.5]] * 3 and a.window == 64 and a.sinks == 4
    b = DeltaConfig.resolve({"theta": [0.1, 0.2, 0.3], "window": 8, "sinks": 0}, cfg)
    assert b.theta[2] == [0.3, 0.3] and b.window == 8 and b.sinks == 0
    c = DeltaConfig.resolve({"theta": [[0.1, 0.2]] * 3}, cfg)
    assert c.theta[0] == [0.1, 0.2]
    assert DeltaConfig.resolve(c, cfg) is c
    assert DeltaConfig.resolve("0.7", cfg).theta[0][0] == 0.7
    for bad in ({"theta": [0.1]}, {"theta": -1.0}, {"theta": [[0.1, 0.2, 0.3]] * 3}, {"window": 3},
                {"theta": 0.1, "bogus": 1}):
        with pytest.raises(ValueError):
            DeltaConfig.resolve(bad, cfg)
    with pytest.raises(ValueError):
        DeltaConfig.resolve(str(tmp_path), cfg)  # a folder needs the model
    # artifact round trip through sparsedge.artifact
    from sparsedge.artifact import ArtifactError, save_section
    model = random_transformer(cfg)
    theta = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    save_section(tmp_path / "art", model, "delta", {"theta": theta}, {"theta": theta.tolist(), "window": 32, "sinks": 2})
    d = DeltaConfig.resolve(tmp_path / "art", model)
    assert d.theta[1] == pytest.approx([0.3, 0.4]) and d.window == 32 and d.sinks == 2
    save_section(tmp_path / "other", model, "ffn", {"x": torch.zeros(1)}, {})
    with pytest.raises(ArtifactError, match="no 'delta' section"):
        DeltaConfig.resolve(tmp_path / "other", model)


def test_tiny_model_theta_zero_greedy_equals_dense():
    cfg = tiny_config(activation="silu", n_kv_heads=2, n_heads=4)
    model = random_transformer(cfg)
    model.ensure_rope(cfg.max_seq_len)
    ids = list(range(3, 60))
    dense, ld = greedy_decode(model, KVCache.dense(cfg, 128, torch.float32, "cpu"), ids, 24)
    for delta in ({"theta": 0.0, "window": 0, "sinks": 0}, {"theta": 0.0}):
        cache = DeltaConfig.resolve(delta, cfg).make_cache(cfg, 128, torch.float32, "cpu")
        got, lg = greedy_decode(model, cache, ids, 24)
        assert got == dense
        torch.testing.assert_close(lg, ld, atol=1e-3, rtol=1e-3)


def test_stories260k_session_theta_zero_matches_dense():
    path = need_data("stories260K/stories260K.bin")
    from sparsedge import Session
    dense = Session.load(path, backend="cpu", progress=False)
    delta = Session.load(path, backend="cpu", progress=False, delta={"theta": 0.0, "window": 0, "sinks": 0})
    a = dense.generate([1], max_new_tokens=80)
    b = delta.generate([1], max_new_tokens=80)
    assert a.token_ids == b.token_ids
    assert b.stats.attn_sparsity is not None and b.stats.k_cache_bytes > 0
    s3 = Session.load(path, backend="cpu", progress=False, delta=0.3)
    c = s3.generate([1], max_new_tokens=80)
    assert 0.0 < c.stats.attn_sparsity < 1.0 and c.stats.k_cache_bytes > 0  # D = 8: the window dominates
    s3.reset()  # outside inference mode: the cache made inside it must still reset
    assert s3.generate([1], max_new_tokens=80).token_ids == c.token_ids


@pytest.mark.slow
def test_smollm2_chat_with_delta_buffers():
    smollm2_gguf()
    from sparsedge import Session
    s = Session.load("smollm2-135m", backend="cpu", progress=False, delta=0.4)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r1 = s.chat(msgs, max_new_tokens=12)
    msgs += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And of Italy?"}]
    r2 = s.chat(msgs, max_new_tokens=12)
    assert r2.stats.prefill_tokens < r2.stats.prompt_tokens
    s.reset()
    fresh = s.chat(msgs, max_new_tokens=12)
    assert fresh.token_ids == r2.token_ids
    # ~70 tokens with W=64 and 4 sinks: almost every key is still in the dense window (keys are encoded when
    # they leave it), so the K side is about a dense cache's size here; the saving starts past the window
    assert r2.stats.k_cache_bytes == s._cache.k_bytes() and r2.stats.k_cache_dense_bytes > 0


def test_ffn_predictors_and_delta_combine(tmp_path):
    """The FFN predictors (layer.ffn) and delta buffers (layer cache) touch different modules."""
    ffn = pytest.importorskip("sparsedge.ffn.module")
    from sparsedge.artifact import save_section
    from sparsedge.testing.synthetic import all_keeping_predictors
    cfg = tiny_config(activation="relu")
    model = random_transformer(cfg)
    model.ensure_rope(cfg.max_seq_len)
    save_section(tmp_path / "art", model, "ffn", all_keeping_predictors(model), {})
    theta = torch.full((cfg.n_layers, cfg.n_kv_heads), 0.0)
    save_section(tmp_path / "art", model, "delta", {"theta": theta}, {"window": 0, "sinks": 0})
    ids = list(range(3, 40))
    dense, ld = greedy_decode(model, KVCache.dense(cfg, 64, torch.float32, "cpu"), ids, 10)
    ffn.attach_predictors(model, tmp_path / "art")
    cache = DeltaConfig.resolve(tmp_path / "art", model).make_cache(cfg, 64, torch.float32, "cpu")
    got, lg = greedy_decode(model, cache, ids, 10)
    assert got == dense
    torch.testing.assert_close(lg, ld, atol=1e-3, rtol=1e-3)
    assert any(type(layer.ffn).__name__ == "SparseFFN" for layer in model.layers)
