"""Phi-3 and BitNet b1.58 GGUF files, as llama.cpp's converter (convert_hf_to_gguf.py: Phi3MiniModel, BitnetModel)
lays them out, written here with the `gguf` package's GGUFWriter from tiny random transformers models, loaded by
sparsedge and compared with transformers on the values the file holds.

Phi-3 ("phi3"): fused blk.N.attn_qkv ([q; k; v]) and blk.N.ffn_up ([gate; up]: llama.cpp's swiglu takes the first
half as the gate, transformers' Phi3MLP chunks the same way), rope.dimension_count for partial rotary,
attention.sliding_window (0: none). Loaded with dtype="float32" (the file's values, dequantized) the session is
exact against transformers' Phi3ForCausalLM (the tolerance of every architecture test, tests/test_architectures.py),
float and quantized (Q8_0 / Q4_0) files alike; loaded natively (quantized blocks through sparsedge::qlinear) it gives
transformers' greedy tokens. LongRoPE files (rope_factors_long / rope_factors_short) are refused by name.

BitNet b1.58 ("bitnet"): projections stored as TQ2_0 (or TQ1_0) blocks of ternary values times a per-tensor scale
(llama.cpp's converter folds the scale into the weights: a block's fp16 d is the scale), attn_sub_norm / ffn_sub_norm,
embeddings tied. What is compared:
- dtype="float32" (weights dequantized: qlinear's composite reference, dequantize then an fp32 matmul) against
  transformers' float BitNetForCausalLM holding the same ternary-times-scale weights: logits within TOL of the largest
  |logit| and identical greedy tokens (transformers' float model does not round activations; neither does this path);
- the native session (TQ2_0 blocks through sparsedge::qlinear: x rounded to int8 per block of 32, as llama.cpp's
  matmul does, NOT transformers' per-token BitLinear rounding) against that dequantized session: each projection
  differs from its composite reference only by the int8 rounding of x (bounded per call in tests/test_quant.py);
  through the model the logits stay within NATIVE_TOL of the largest |logit| here, and the greedy tokens equal
  transformers';
- a TQ1_0 file of the same weights runs as the same TQ2_0 blocks (bit-identical logits).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from sparsedge import Session
from sparsedge.generate import decode_one_token, new_cache, prefill
from sparsedge.loading import ModelFormatError, hf_config_to_model_config
from sparsedge.quant import formats as qf
from sparsedge.quant import load_only
from sparsedge.quant.qweight import QWeight

from .test_architectures import write_gguf as _write
from .test_architectures import (N_DECODE, SMALL, V, check_exact, hf_greedy, randomize, save_tokenizer,
                                 shape_meta)

transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType
NATIVE_TOL = 0.05  # native TQ2_0 session vs the dequantized one: the int8 rounding of x, through 2 layers


def _same_config(cfg, hf_model) -> bool:
    """The GGUF's ModelConfig is the one the transformers path builds from the model's config (the tokenizer's ids
    aside; GGUF stores the RMSNorm eps as float32, the value the kernels use either way)."""
    want = hf_config_to_model_config(hf_model.config.to_dict(), cfg.name)
    assert float(np.float32(want.norm_eps)) == cfg.norm_eps
    return cfg.replace(eos_token_ids=want.eos_token_ids, bos_token_id=want.bos_token_id, norm_eps=want.norm_eps) == want


# ---- Phi-3 --------------------------------------------------------------------------------------------------------
PHI3_NAMES = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def phi3_gguf(path, m, quantize=None, long_rope: bool = False) -> None:
    """Phi3MiniModel.set_gguf_parameters' metadata (and, with long_rope, generate_extra_tensors' LongRoPE factors)."""
    c = m.config
    prf = c.rope_parameters.get("partial_rotary_factor", 1.0)
    n_rot = int(prf * c.hidden_size) // c.num_attention_heads

    def meta(wr):
        wr.add_context_length(c.max_position_embeddings)
        wr.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        shape_meta(wr, c)
        wr.add_rope_dimension_count(n_rot)
        wr.add_rope_freq_base(c.rope_parameters["rope_theta"])
        wr.add_sliding_window(c.sliding_window or 0)
        if long_rope:
            wr.add_rope_scaling_attn_factors(1.19)

    extra = ()
    if long_rope:
        extra = [("rope_factors_long.weight", np.full(n_rot // 2, 2.0, np.float32)),
                 ("rope_factors_short.weight", np.ones(n_rot // 2, np.float32))]
    _write(path, "phi3", m, PHI3_NAMES, meta, quantize, extra)


def _phi3(**kw):
    from transformers import Phi3Config, Phi3ForCausalLM

    m = Phi3ForCausalLM(Phi3Config(**SMALL, **kw))
    randomize(m)
    return m.eval()


def test_phi3_gguf_exact(tmp_path):
    """A float Phi-3 GGUF: the transformers path's ModelConfig, fused tensors split exactly, its sliding window on
    every layer (as transformers applies it; llama.cpp currently disables Phi-3's window), exact logits."""
    m = _phi3(sliding_window=10)
    phi3_gguf(tmp_path / "p.gguf", m)
    save_tokenizer(tmp_path / "tok")
    s = Session.load(tmp_path / "p.gguf", dtype="float32", backend="cpu", tokenizer=tmp_path / "tok")
    cfg = s.model.config
    assert _same_config(cfg, m)
    assert cfg.arch == "phi3" and cfg.sliding_layers == [0, 1, 2] and cfg.sliding_window == 10 and not cfg.rotary_dim
    check_exact(s, m, prompt_len=24)


def test_phi3_gguf_quantized_partial_rotary(tmp_path):
    """Q8_0 attn_qkv and ffn_up (split as block rows), Q4_0 attn_output, partial rotary (8 of 16 channels): exact
    dequantized; natively (qlinear on the blocks) transformers' greedy tokens."""
    m = _phi3(partial_rotary_factor=0.5)
    phi3_gguf(tmp_path / "p.gguf", m, {"attn_qkv.weight": Q.Q8_0, "ffn_up.weight": Q.Q8_0,
                                       "attn_output.weight": Q.Q4_0})
    save_tokenizer(tmp_path / "tok")
    s = Session.load(tmp_path / "p.gguf", dtype="float32", backend="cpu", tokenizer=tmp_path / "tok")
    cfg = s.model.config
    assert cfg.rotary_dim == 8 and cfg.head_dim == 16 and cfg.sliding_layers == []
    assert _same_config(cfg, m)
    check_exact(s, m)
    native = Session.load(tmp_path / "p.gguf", backend="cpu", tokenizer=tmp_path / "tok")
    layer = native.model.layers[0]
    assert isinstance(layer.attention.wqkv, QWeight) and layer.attention.wqkv.qtype == "q8_0"
    ids = list(range(3, 23))
    assert native.generate(ids, max_new_tokens=8, temperature=0.0, ignore_eos=True).token_ids == hf_greedy(m, ids, 8)


def test_phi3_gguf_long_rope_refused(tmp_path):
    m = _phi3()
    phi3_gguf(tmp_path / "p.gguf", m, long_rope=True)
    with pytest.raises(ModelFormatError, match=r"LongRoPE: rope_factors_long\.weight, rope_factors_short\.weight.*"
                                               r"'longrope'") as ei:
        Session.load(tmp_path / "p.gguf", dtype="float32", backend="cpu", tokenizer=tmp_path)
    assert "\n" not in str(ei.value)


# ---- BitNet b1.58 -------------------------------------------------------------------------------------------------
BITNET = dict(SMALL, hidden_size=256, intermediate_size=512, num_hidden_layers=2, tie_word_embeddings=True)
BITNET_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "self_attn.attn_sub_norm": "attn_sub_norm", "post_attention_layernorm": "ffn_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                "mlp.ffn_sub_norm": "ffn_sub_norm"}
PROJ = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
        "ffn_down.weight")


def _bitnet(seed: int = 0, **kw):
    """A tiny BitNetForCausalLM whose projections are ternary values times a per-tensor scale (an fp16 value, so a TQ
    block's d holds it exactly), as llama.cpp's converter writes BitNet b1.58 weights."""
    from transformers import BitNetConfig, BitNetForCausalLM

    m = BitNetForCausalLM(BitNetConfig(**{**BITNET, **kw}))
    randomize(m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:
                scale = float(torch.tensor(0.12 * (64 / p.shape[1]) ** 0.5).half())
                p.copy_(torch.randint(-1, 2, p.shape, generator=g).float() * scale)
    return m.eval()


def bitnet_gguf(path, m, proj_type=Q.TQ2_0, activation: str | None = None, extra=()) -> None:
    """BitnetModel's metadata (its rope scaling "linear", factor 1), projections in proj_type, embeddings Q8_0."""
    c = m.config

    def meta(wr):
        wr.add_context_length(c.max_position_embeddings)
        shape_meta(wr, c)
        wr.add_rope_freq_base(c.rope_parameters["rope_theta"])
        wr.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(1.0)
        if activation is not None:
            wr.add_string("bitnet.hidden_activation", activation)

    quantize = {k: proj_type for k in PROJ}
    quantize["token_embd.weight"] = Q.Q8_0
    _write(path, "bitnet", m, BITNET_NAMES, meta, quantize, extra)


def _logits(session, ids: list[int], toks: list[int]) -> torch.Tensor:
    """Logits after every position of ids + toks (prefill of ids, then toks decoded one at a time)."""
    model = session.model
    cache = new_cache(model, len(ids) + len(toks) + 1)
    with torch.inference_mode():
        out = [prefill(model, ids, cache, all_logits=True).float()]
        for step, t in enumerate(toks):
            out.append(decode_one_token(model, t, len(ids) + step, cache).float())
    return torch.cat(out)


@pytest.fixture(scope="module")
def bitnet_files(tmp_path_factory):
    """One tiny BitNet b1.58 (2 layers, d 256, I 512) as TQ2_0 and TQ1_0 files, its transformers model, a tokenizer."""
    tmp = tmp_path_factory.mktemp("bitnet")
    m = _bitnet()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    bitnet_gguf(tmp / "tq2.gguf", m, Q.TQ2_0)
    for k, v in m.state_dict().items():  # the ternary values survive TQ2_0 exactly (d = the fp16 scale)
        assert torch.equal(v, state[k]) or "embed_tokens" in k or "lm_head" in k, k
    bitnet_gguf(tmp / "tq1.gguf", m, Q.TQ1_0)
    save_tokenizer(tmp / "tok")
    return m, tmp


def test_bitnet_gguf_dequantized_exact(bitnet_files):
    """dtype="float32": the TQ2_0 file's values in fp32 matmuls (qlinear's composite reference) against transformers'
    float BitNetForCausalLM on the same ternary weights: exact (TOL), the same greedy tokens."""
    m, tmp = bitnet_files
    s = Session.load(tmp / "tq2.gguf", dtype="float32", backend="cpu", tokenizer=tmp / "tok")
    cfg = s.model.config
    assert cfg.arch == "bitnet" and cfg.activation == "relu2" and cfg.sub_norms and cfg.tie_embeddings
    assert cfg.rope_scaling is None and cfg.rope_theta == m.config.rope_parameters["rope_theta"]
    assert _same_config(cfg, m)
    check_exact(s, m)


def test_bitnet_gguf_native_tq2_0(bitnet_files):
    """The TQ2_0 blocks run natively (qlinear, int8 x per block of 32 as llama.cpp): logits within NATIVE_TOL of the
    dequantized session's (the composite reference), greedy tokens equal to transformers'; TQ1_0 runs as the same
    TQ2_0 blocks, bit for bit."""
    m, tmp = bitnet_files
    tok = tmp / "tok"
    native = Session.load(tmp / "tq2.gguf", backend="cpu", tokenizer=tok)
    ref = Session.load(tmp / "tq2.gguf", dtype="float32", backend="cpu", tokenizer=tok)
    layer = native.model.layers[0]
    assert isinstance(layer.attention.wqkv, QWeight) and layer.attention.wqkv.qtype == "tq2_0"
    assert layer.ffn.w_down.qtype == "tq2_0"
    ids = torch.randint(3, V, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    toks = hf_greedy(m, ids, N_DECODE)
    got, want = _logits(native, ids, toks), _logits(ref, ids, toks)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < NATIVE_TOL, f"native TQ2_0 logits differ from the composite reference by {err:.3e} of max |logit|"
    assert native.generate(ids, max_new_tokens=N_DECODE, temperature=0.0, ignore_eos=True).token_ids == toks
    tq1 = Session.load(tmp / "tq1.gguf", backend="cpu", tokenizer=tok)
    assert torch.equal(tq1.model.layers[1].ffn.w_down.data, native.model.layers[1].ffn.w_down.data)
    assert torch.equal(_logits(tq1, ids, toks), got)


def test_bitnet_gguf_silu_activation(tmp_path):
    """bitnet.hidden_activation = "silu" (1bitLLM's bitnet_b1_58, what llama.cpp's graph runs) is honoured."""
    m = _bitnet(seed=3, hidden_act="silu", num_hidden_layers=1)
    bitnet_gguf(tmp_path / "b.gguf", m, activation="silu")
    save_tokenizer(tmp_path / "tok")
    s = Session.load(tmp_path / "b.gguf", dtype="float32", backend="cpu", tokenizer=tmp_path / "tok")
    assert s.model.config.activation == "silu"
    check_exact(s, m)


def test_bitnet_gguf_refusals(tmp_path):
    m = _bitnet(num_hidden_layers=1)
    bitnet_gguf(tmp_path / "s.gguf", m, extra=[("blk.0.attn_q.scale", np.ones(1, np.float32))])
    with pytest.raises(ModelFormatError, match=r"per-tensor output scales \('blk\.0\.attn_q\.scale'"):
        Session.load(tmp_path / "s.gguf", backend="cpu", tokenizer=tmp_path)
    bitnet_gguf(tmp_path / "a.gguf", m, activation="gelu")
    with pytest.raises(ModelFormatError, match="bitnet.hidden_activation='gelu' is not supported"):
        Session.load(tmp_path / "a.gguf", backend="cpu", tokenizer=tmp_path)


# ---- TQ1_0 / TQ2_0 blocks -----------------------------------------------------------------------------------------
F16_EDGES = [0x0000, 0x8000, 0x0001, 0x03FF, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00]


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_ternary_blocks_dequantize_like_gguf(qtype):
    """tq1_0 (load-only) and tq2_0 dequantize bit-identically to gguf's reference, on random bytes (codes 3 of tq2_0,
    NaN / inf / subnormal scales included); tq1_0 repacked as tq2_0 holds the same values."""
    fmt = load_only.FORMATS.get(qtype) or qf.get_format(qtype)
    raw = np.random.default_rng(fmt.ggml_type).integers(0, 256, (24, 3 * fmt.type_size), dtype=np.uint8)
    raw[0] = 0
    blocks = raw.reshape(24, 3, fmt.type_size)
    for i, bits in enumerate(F16_EDGES):
        blocks[1 + i, :, -2:] = np.array([bits], dtype=np.uint16).view(np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, Q(fmt.ggml_type)).reshape(24, 768)
    deq = load_only.dequantize if qtype == "tq1_0" else qf.dequantize
    outs = [deq(torch.from_numpy(raw), qtype, 768).numpy()]
    if qtype == "tq1_0":
        outs.append(qf.dequantize(load_only.tq1_0_as_tq2_0(torch.from_numpy(raw), 768), "tq2_0", 768).numpy())
    nan = np.isnan(ref)
    for ours in outs:
        assert np.array_equal(np.isnan(ours), nan)
        assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))
