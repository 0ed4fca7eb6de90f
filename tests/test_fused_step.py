"""sparsedge.fused_step: the C++ layer loop of a decode step gives the Python path's logits bit for bit (same ops,
same order), keeps the same statistics, and is used only where it applies."""
from __future__ import annotations

import pytest

import torch

from sparsedge import Session, fused_step
from sparsedge import stats as work
from sparsedge.delta.cache import DeltaLayerCache
from sparsedge.ffn.module import attach_tensors, detach_predictors
from sparsedge.generate import decode_one_token, new_cache, prefill

from .conftest import smollm2_gguf
from .test_downskip import native, tiny_q4  # noqa: F401 (a fixture)



def both_paths(model, ids, n, make_cache):
    """(logits per step, stats) of n greedy decode steps with the plan, then without (same model)."""
    out = []
    for enabled in (True, False):
        fused_step.enabled = enabled
        try:
            work.reset(model)
            cache = make_cache()
            steps = []
            with torch.inference_mode():
                logits = prefill(model, ids, cache)
                pos = len(ids)
                for _ in range(n):
                    logits = decode_one_token(model, int(logits.argmax()), pos, cache)
                    steps.append(logits)
                    pos += 1
            assert (fused_step.plan_for(model, cache) is not None) == enabled
            out.append((steps, work.read(model), cache))
        finally:
            fused_step.enabled = True
    return out


def assert_same(a, b):
    (la, sa, ca), (lb, sb, cb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    assert sa == sb
    assert [lc.length for lc in ca.layers] == [lc.length for lc in cb.layers]
    assert all(torch.equal(x.k, y.k) and torch.equal(x.v, y.v) for x, y in zip(ca.layers, cb.layers))


def test_quantized_dense_and_down_skip_are_bit_identical(tiny_q4):
    m = native(tiny_q4)
    ids = list(range(3, 20))
    mk = lambda: new_cache(m, 64)  # noqa: E731
    assert_same(*both_paths(m, ids, 12, mk))
    I = m.config.intermediate_size
    attach_tensors(m, {f"layers.{i}.down_thresh": torch.full((I,), 0.02) for i in range(m.config.n_layers)})
    a, b = both_paths(m, ids, 12, mk)
    assert_same(a, b)
    assert 0 < a[1].ffn_down_sparsity < 1  # the loop counted kept rows, and some were skipped
    detach_predictors(m)


def test_float_model_is_bit_identical(stories_path):
    s = Session.load(stories_path, backend="cpu", progress=False)
    assert_same(*both_paths(s.model, s.tokenizer.encode("Once upon a time"), 10, lambda: s.new_cache(64)))


def test_smollm2_native_is_bit_identical():
    smollm2_gguf()
    s = Session.load("smollm2-135m", backend="cpu", progress=False, max_seq_len=128)
    assert_same(*both_paths(s.model, s.tokenizer.encode("The capital of France is"), 6, lambda: s.new_cache(64)))


DELTA_BUFFERS = ("ref", "values", "chan", "offsets", "sink_k", "window_k", "v_cache")


@pytest.mark.parametrize("window,sinks", [(8, 2), (0, 0), (1, 4)])
def test_delta_cache_is_bit_identical(stories_path, monkeypatch, window, sinks):
    """The delta cache's decode steps run as `delta_step` in the C++ loop (its attend is called back only for the
    steps that must grow the buffer, which this small initial capacity forces): same logits, statistics, buffers
    and counters as the Python path, and truncate / a further prefill behave the same afterwards."""
    s = Session.load(stories_path, backend="cpu", progress=False,
                     delta={"theta": 0.1, "window": window, "sinks": sinks, "initial_density": 0.05, "growth": 0.05})
    steps = []  # (fused?, position) of every _step the Python side ran
    orig = DeltaLayerCache._step
    monkeypatch.setattr(DeltaLayerCache, "_step", lambda self, q, k, v, p: steps.append((fused_step.enabled, p)) or
                        orig(self, q, k, v, p))
    ids = s.tokenizer.encode("Once upon a time, there was a little girl")
    a, b = both_paths(s.model, ids, 48, lambda: s.new_cache(64))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]
    assert sum(lc.stats()["zero_delta_entries"] for lc in a[2].layers) > 0
    n_layers, n = len(s.model.layers), 48 * len(s.model.layers)
    python_steps = sum(1 for fused, _ in steps if not fused)
    cpp_fallbacks = sum(1 for fused, _ in steps if fused)
    assert python_steps == n - n_layers * (window > len(ids))  # every layer's every decode step past the window
    assert 0 < cpp_fallbacks < python_steps // 4  # the C++ loop ran the rest itself
    grown = [lc.grow_events for lc in a[2].layers]
    assert min(grown) > 0 and grown == [lc.grow_events for lc in b[2].layers]
    for x, y in zip(a[2].layers, b[2].layers):
        for name in DELTA_BUFFERS:
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert torch.equal(x.state[:3], y.state[:3])  # length, encoded, used bound (the 4th: when stats were read)
        assert x.stats() == y.stats() and x.k_bytes() == y.k_bytes()
        assert x.truncate(x.length - 1) == y.truncate(y.length - 1)
        assert x.length == y.length and x.stats() == y.stats()


def test_plan_is_not_used_where_it_does_not_apply(stories_path, tiny_q4):
    s = Session.load(stories_path, backend="cpu", progress=False)
    s.model.layers[1].ffn.tau = 0.1  # a dense FFN with a runtime CATS threshold runs in Python
    assert fused_step.plan_for(s.model, s.new_cache(32)) is None
    m = native(tiny_q4)
    cache = new_cache(m, 32)
    plan = fused_step.plan_for(m, cache)
    assert plan is not None and fused_step.plan_for(m, cache) is plan  # cached
    I = m.config.intermediate_size
    attach_tensors(m, {f"layers.{i}.down_thresh": torch.zeros(I) for i in range(m.config.n_layers)})
    assert fused_step.plan_for(m, cache) not in (None, plan)  # rebuilt for the new FFN modules


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_general_path_models_are_bit_identical(tmp_path, arch):
    """Gemma 3 (scaled embeddings, q/k norms, post-norms, sliding layers with their own RoPE tables, softcapping
    where the config asks) and Qwen3 (q/k norms), tiny random transformers models: the C++ loop gives the Python
    general path's logits bit for bit, past the sliding window."""
    from .test_architectures import build, transformers
    if arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            sliding_window=8, max_position_embeddings=128, final_logit_softcapping=30.0)
        hf = transformers.Gemma3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128)
        hf = transformers.Qwen3ForCausalLM(cfg)
    s = build(tmp_path, hf)
    assert_same(*both_paths(s.model, list(range(3, 15)), 14, lambda: s.new_cache(64)))


def _svd_tensors(model, rank=8, bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(model.config.n_layers):
        d, I = model.config.dim, model.config.intermediate_size
        out[f"layers.{i}.p1"] = torch.randn(rank, d, generator=g) / d ** 0.5
        out[f"layers.{i}.p2"] = torch.randn(I, rank, generator=g)
        out[f"layers.{i}.bias"] = torch.full((I,), float(bias))
    return out


def _assert_sparse_ffn_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]
    assert 0.05 < a[1].ffn_sparsity < 0.95  # the predictor skipped neurons, and the loop counted them


def test_predictor_ffns_are_bit_identical(stories_path):
    """SparseFFN (SVD predictor, sparse_ffn) and Q4SparseFFN (ffn_predict_q4 + sparse_ffn_rows) on float weights run
    in the C++ loop: same logits and statistics as the Python path."""
    from sparsedge.testing.synthetic import all_keeping_q4_predictors

    s = Session.load(stories_path, backend="cpu", progress=False)
    m, ids = s.model, s.tokenizer.encode("Once upon a time")
    attach_tensors(m, _svd_tensors(m))
    assert type(m.layers[0].ffn).__name__ == "SparseFFN"
    _assert_sparse_ffn_same(*both_paths(m, ids, 10, lambda: s.new_cache(64)))
    detach_predictors(m)
    q4 = all_keeping_q4_predictors(m)
    for k in q4:
        if k.endswith(".thresh"):
            q4[k] = torch.full_like(q4[k], 0.02)  # some neurons inactive
    attach_tensors(m, q4)
    assert type(m.layers[0].ffn).__name__ == "Q4SparseFFN"
    _assert_sparse_ffn_same(*both_paths(m, ids, 10, lambda: s.new_cache(64)))
    detach_predictors(m)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_svd_predictor_on_block_weights_is_bit_identical(qtype):
    """A relu model on block weights: ffn_predict + qsparse_ffn_rows from the C++ loop, bit-identical."""
    from sparsedge.testing.synthetic import quantize_transformer, random_transformer, tiny_config

    m = quantize_transformer(random_transformer(tiny_config("relu"), seed=5), qtype)
    attach_tensors(m, _svd_tensors(m, bias=0.0, seed=1))
    assert m.layers[0].ffn.down_t is not None
    _assert_sparse_ffn_same(*both_paths(m, list(range(3, 15)), 10, lambda: new_cache(m, 64)))
    detach_predictors(m)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "f16"])
def test_embedding_rows_in_cpp_are_the_dequantized_rows(qtype):
    """The C++ step looks up q8_0 / q4_0 embedding rows itself (one fp32 product per value, as the torch
    dequantization); other formats are left to the torch ops (None)."""
    from sparsedge.backends import _cpu_kernels
    from sparsedge.quant.qweight import QWeight
    w = QWeight.quantize(torch.randn(40, 256, generator=torch.Generator().manual_seed(1)) * 3, qtype)
    for token in (0, 17, 39):
        row = _cpu_kernels.embed_row(w.data, w.qtype, w.K, token)
        if qtype in ("q8_0", "q4_0"):
            assert torch.equal(row, w.rows(torch.tensor([token])).dequantize())
        else:
            assert row is None
    if qtype in ("q8_0", "q4_0"):
        with pytest.raises(RuntimeError, match="outside the 40-row table"):
            _cpu_kernels.embed_row(w.data, w.qtype, w.K, 40)
