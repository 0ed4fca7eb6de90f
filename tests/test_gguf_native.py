"""Native GGUF loading (sparsedge.loading.gguf_file / gguf): tiny files written with the `gguf` package's writer,
so every check is independent of our reader; plus the real SmolLM2 file for the quantized session."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch

from sparsedge import Session
from sparsedge import stats as work
from sparsedge.backends import get_backend
from sparsedge.generate import greedy, new_cache, prefill
from sparsedge.loading import ModelFormatError, open_model
from sparsedge.loading.build import build_transformer
from sparsedge.loading.gguf import unpermute_rows
from sparsedge.quant.qweight import QWeight, dequantized

from .conftest import smollm2_gguf

CPU = get_backend("cpu")
T = gguf.GGMLQuantizationType
DIM, INTER, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 96


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to W_q / W_k rows (adjacent-pair RoPE order), written from its definition."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    D = DIM // HEADS
    w = {"token_embd.weight": g.standard_normal((VOCAB, DIM)), "output_norm.weight": 1 + 0.1 * g.standard_normal(DIM)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = 1 + 0.1 * g.standard_normal(DIM)
        w[p + "ffn_norm.weight"] = 1 + 0.1 * g.standard_normal(DIM)
        w[p + "attn_q.weight"] = g.standard_normal((HEADS * D, DIM)) / 8
        w[p + "attn_k.weight"] = g.standard_normal((KV * D, DIM)) / 8
        w[p + "attn_v.weight"] = g.standard_normal((KV * D, DIM)) / 8
        w[p + "attn_output.weight"] = g.standard_normal((DIM, HEADS * D)) / 8
        w[p + "ffn_gate.weight"] = g.standard_normal((INTER, DIM)) / 8
        w[p + "ffn_up.weight"] = g.standard_normal((INTER, DIM)) / 8
        w[p + "ffn_down.weight"] = g.standard_normal((DIM, INTER)) / 11
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_gguf(path, weights: dict, qtypes: dict[str, T], extra_tensor=None) -> None:
    """A llama GGUF as llama.cpp's converter lays it out: q/k rows permuted, weights in `qtypes` (default F32)."""
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_block_count(LAYERS)
    wr.add_context_length(256)
    wr.add_embedding_length(DIM)
    wr.add_feed_forward_length(INTER)
    wr.add_head_count(HEADS)
    wr.add_head_count_kv(KV)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_freq_base(10000.0)
    wr.add_vocab_size(VOCAB)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    for name, w in weights.items():
        if name.endswith("attn_q.weight"):
            w = llama_cpp_permute(w, HEADS)
        elif name.endswith("attn_k.weight"):
            w = llama_cpp_permute(w, KV)
        qt = qtypes.get(name.split(".")[-2], T.F32) if w.ndim == 2 else T.F32
        if qt == T.F32:
            wr.add_tensor(name, w)
        else:
            q = gguf.quants.quantize(w, qt)
            wr.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
    if extra_tensor is not None:
        wr.add_tensor(*extra_tensor[:2], raw_shape=extra_tensor[2], raw_dtype=extra_tensor[3])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


QTYPES = {"attn_q": T.Q8_0, "attn_k": T.Q4_0, "attn_v": T.Q4_1, "attn_output": T.Q8_0, "ffn_gate": T.Q4_1,
          "ffn_up": T.Q4_1, "ffn_down": T.Q8_0, "token_embd": T.Q8_0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = hf_weights()
    write_gguf(path, w, QTYPES)
    return path, w


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        back = torch.from_numpy(llama_cpp_permute(w, heads))[unpermute_rows(w.shape[0], heads)]
        assert torch.equal(back, torch.from_numpy(w))


def test_native_source_keeps_blocks_and_restores_hf_rows(tiny):
    path, w = tiny
    src = open_model(path)
    cfg = src.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size) == (DIM, LAYERS, HEADS, KV, INTER)
    assert src.quantized and cfg.tie_embeddings
    got = dict(src.tensors())
    wq = got["layers.1.wq"]
    assert isinstance(wq, QWeight) and wq.qtype == "q8_0"
    # quantization is per row, so the rows come back in HF order with the values gguf's own round trip gives
    expect = gguf.quants.dequantize(gguf.quants.quantize(w["blk.1.attn_q.weight"], T.Q8_0), T.Q8_0)
    assert torch.equal(wq.dequantize(), torch.from_numpy(expect))
    wk = got["layers.0.wk"]
    expect = gguf.quants.dequantize(gguf.quants.quantize(w["blk.0.attn_k.weight"], T.Q4_0), T.Q4_0)
    assert wk.qtype == "q4_0" and torch.equal(wk.dequantize(), torch.from_numpy(expect))
    assert isinstance(got["norm"], torch.Tensor) and torch.equal(got["norm"], torch.from_numpy(w["output_norm.weight"]))


def test_native_and_dequantized_models_agree(tiny):
    path, _ = tiny
    native = build_transformer(open_model(path), CPU, torch.float32, progress=False, mode="native")
    deq = build_transformer(open_model(path), CPU, torch.float32, progress=False, mode=None)
    a = native.layers[0].attention
    assert isinstance(a.wqkv, tuple)  # q8_0 / q4_0 / q4_1 rows: three formats, kept apart
    assert isinstance(native.layers[0].ffn.w_gate_up, QWeight) and native.layers[0].ffn.w_down_t is None
    assert torch.equal(dequantized(a.wqkv), deq.layers[0].attention.wqkv)
    ids = list(range(3, 40))
    with torch.inference_mode():
        ln = prefill(native, ids, new_cache(native, 64), all_logits=True)
        ld = prefill(deq, ids, new_cache(deq, 64), all_logits=True)
    # the fused kernels round activations to int8 per block of 32 (as llama.cpp): close, not equal
    rel = (ln - ld).norm() / ld.norm()
    assert rel < 0.03, rel
    # what a quantized step reads is the blocks' bytes, not fp32 weights
    work.reset(native)
    greedy(native, ids[:4], 3)
    st = work.read(native)
    assert st.weight_bytes_per_token < 0.5 * deq.dense_weight_bytes_per_token()


def test_truncated_gguf_is_named_before_any_work(tiny, tmp_path):
    path, _ = tiny
    data = path.read_bytes()
    for cut in (len(data) // 2, 200, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match="truncated") as exc:
            open_model(bad)
        assert str(bad) in str(exc.value)


def test_unsupported_block_type_names_it_and_the_supported_ones(tmp_path):
    path = tmp_path / "q2k.gguf"
    w = hf_weights()
    q = np.zeros((4, 84), np.uint8)  # four Q2_K blocks (256 values in 84 bytes each); Q5_0 loads (dequantized)
    write_gguf(path, w, {}, extra_tensor=("blk.0.extra.weight", q, q.shape, T.Q2_K))
    with pytest.raises(ModelFormatError, match=r"Q2_K.*supported types: .*q4_1.*q5_0") as exc:
        open_model(path)
    assert "blk.0.extra.weight" in str(exc.value)


def test_not_a_llama_architecture_is_refused(tmp_path):
    path = tmp_path / "other.gguf"
    wr = gguf.GGUFWriter(str(path), "mamba")
    wr.add_tensor("x", np.zeros((2, 32), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(ModelFormatError, match="architecture 'mamba' is not supported"):
        open_model(path)


def test_quantize_on_load_stories(stories_path):
    f32 = Session.load(stories_path, backend="cpu", progress=False)
    q8 = Session.load(stories_path, backend="cpu", weights="q8_0", progress=False)
    ffn = q8.model.layers[0].ffn
    assert isinstance(q8.model.layers[0].attention.wqkv, QWeight) and isinstance(ffn.w_gate_up, QWeight)
    assert ffn.w_down_t is not None  # rows of 172 values are not a multiple of 32: they stay float
    ids = f32.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play")
    with torch.inference_mode():
        lf = prefill(f32.model, ids, f32.new_cache(), all_logits=True)
        lq = prefill(q8.model, ids, q8.new_cache(), all_logits=True)
    nll = [float(torch.nn.functional.cross_entropy(x[:-1], torch.tensor(ids[1:]))) for x in (lf, lq)]
    assert abs(math.exp(nll[1]) / math.exp(nll[0]) - 1) < 0.02, nll
    with pytest.raises(ValueError, match="unknown weights 'q3_k'"):
        Session.load(stories_path, weights="q3_k")


@pytest.fixture(scope="module")
def smollm2_native():
    smollm2_gguf()
    return Session.load("smollm2-135m", backend="cpu", progress=False)


def test_smollm2_native_runs_its_own_blocks(smollm2_native):
    m = smollm2_native.model
    assert isinstance(m.tok_embeddings, QWeight) and m.tok_embeddings.qtype == "q8_0"
    assert m.layers[3].ffn.w_gate_up.qtype == "q4_1" and m.layers[3].attention.wqkv.qtype == "q4_1"
    r = smollm2_native.generate("The capital of France is", max_new_tokens=8)
    assert "Paris" in r.text
    # bytes a decode step reads: the file's blocks (~97 MB), not 540 MB of fp32
    assert r.stats.weight_bytes_per_token < 110e6


def test_smollm2_native_perplexity_close_to_dequantized(smollm2_native, wikitext_path):
    from sparsedge.evaluate import perplexity, read_text, token_windows
    deq = Session.load("smollm2-135m", backend="cpu", dtype="float32", progress=False)
    windows = token_windows(deq.tokenizer, read_text(wikitext_path), 512, 256)
    a = perplexity(smollm2_native, windows, progress=False)["ppl"]
    b = perplexity(deq, windows, progress=False)["ppl"]
    # the fused kernels round activations to int8 per block of 32, as llama.cpp does (measured: +1.1% over the
    # dequantized fp32 path on these tokens, while llama.cpp on the same file and windows is 0.2% below us)
    assert abs(a / b - 1) < 0.02, (a, b)


def test_one_fingerprint_for_one_file_loaded_either_way(smollm2_native):
    """Artifacts refer to the weights, not the execution format: the native session, the dequantized one, and the
    manifests written before native loading existed (docs/results) name the same identity."""
    import json
    from pathlib import Path

    from sparsedge.artifact import weights_fingerprint
    deq = Session.load("smollm2-135m", backend="cpu", dtype="float32", progress=False)
    fp = weights_fingerprint(smollm2_native.model)
    assert fp == weights_fingerprint(deq.model)
    manifest = Path(__file__).resolve().parents[1] / "docs" / "results" / "delta_balanced70_perhead_manifest.json"
    assert json.loads(manifest.read_text())["model"]["fingerprint"] == fp


def test_key_scale_folds_exactly_into_quantized_rows(smollm2_native):
    """Delta attention's power-of-two q/k channel balancing on a quantized session: the fp16 block scales are
    scaled, so logits are bit-identical and unfolding restores the bytes."""
    from sparsedge.artifact import weights_fingerprint
    from sparsedge.delta.balance import fold_key_scale

    m, cfg = smollm2_native.model, smollm2_native.config
    ids = smollm2_native.tokenizer.encode("The history of the city begins")
    before = [layer.attention.wqkv.data.clone() for layer in m.layers]
    fp = weights_fingerprint(m)
    with torch.inference_mode():
        a = prefill(m, ids, new_cache(m, 64), all_logits=True)
    half = torch.exp2(torch.randint(-2, 3, (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim // 2)).float())
    fold_key_scale(m, torch.cat([half, half], -1))
    try:
        assert not torch.equal(m.layers[0].attention.wqkv.data, before[0])
        with torch.inference_mode():
            b = prefill(m, ids, new_cache(m, 64), all_logits=True)
        assert torch.equal(a, b) and weights_fingerprint(m) == fp
    finally:
        fold_key_scale(m, None)
    assert all(torch.equal(layer.attention.wqkv.data, w) for layer, w in zip(m.layers, before))


def test_alias_and_path_name_the_same_model():
    """An artifact calibrated with `--model smollm2-135m` fits the session loaded from the file's path (the config
    name is part of the weights' fingerprint)."""
    path = smollm2_gguf()
    assert open_model(str(path)).config.name == open_model("smollm2-135m").config.name == "smollm2-135m"
