"""Model loaders: llama2.c .bin, transformers folders (plain, sharded, Qwen2 biases), GGUF, errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

try:
    from .conftest import need_data, smollm2_gguf
except ImportError:  # tests/ run as a plain folder
    from conftest import need_data, smollm2_gguf
from sparsedge.testing import data as sdata
from sparsedge.config import UnsupportedArchitectureError
from sparsedge.loading import (ModelFormatError, expected_shapes, hf_config_to_model_config, llama2c_to_hf,
                               open_model)
from sparsedge.loading.llama2c import permute_rope_rows, read_header
from sparsedge.tokenizer import HFTokenizer, Llama2cTokenizer


@pytest.fixture(scope="module")
def stories_bin():
    return need_data(sdata.STORIES260K)


@pytest.fixture(scope="module")
def stories_source(stories_bin):
    return open_model(stories_bin)


@pytest.fixture(scope="module")
def stories_tensors(stories_source):
    return {k: v.clone() for k, v in stories_source.tensors()}


@pytest.fixture(scope="module")
def converted(stories_bin, tmp_path_factory):
    return llama2c_to_hf(stories_bin, tmp_path_factory.mktemp("stories260K_hf"))


# ---- llama2.c ------------------------------------------------------------------------------------

def test_stories_config(stories_source):
    c = stories_source.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.intermediate_size) == (512, 64, 5, 8, 4, 172)
    assert c.head_dim == 8 and c.max_seq_len == 512 and c.tie_embeddings
    assert c.norm_eps == 1e-5 and c.rope_theta == 10000.0 and c.rope_scaling is None
    assert c.activation == "silu" and not c.qkv_bias
    assert c.bos_token_id == 1 and c.eos_token_ids == [2] and c.arch == "llama2c"
    assert stories_source.describe().startswith("llama2c:")
    assert isinstance(stories_source.tokenizer, Llama2cTokenizer)


def test_stories_tensors(stories_source, stories_tensors, stories_bin):
    want = expected_shapes(stories_source.config)
    assert list(stories_tensors) == list(want)  # canonical order
    assert len(want) == 1 + 5 * 9 + 1
    for name, t in stories_tensors.items():
        assert tuple(t.shape) == want[name] and t.dtype == torch.float32
    raw = np.fromfile(stories_bin, dtype=np.float32, offset=28)
    emb = torch.from_numpy(raw[:512 * 64].reshape(512, 64).copy())
    assert torch.equal(stories_tensors["tok_embeddings"], emb)
    rms_att0 = torch.from_numpy(raw[512 * 64:512 * 64 + 64].copy())
    assert torch.equal(stories_tensors["layers.0.attn_norm"], rms_att0)
    wq0 = torch.from_numpy(raw[512 * 64 + 5 * 64:512 * 64 + 5 * 64 + 64 * 64].reshape(64, 64).copy())
    assert torch.equal(stories_tensors["layers.0.wq"], permute_rope_rows(wq0, 8))
    assert not torch.equal(stories_tensors["layers.0.wq"], wq0)


def _rope_interleaved(v, pos, theta=10000.0):
    d = v.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * freqs
    x0, x1 = v[..., 0::2], v[..., 1::2]
    out = torch.empty_like(v)
    out[..., 0::2] = x0 * ang.cos() - x1 * ang.sin()
    out[..., 1::2] = x0 * ang.sin() + x1 * ang.cos()
    return out


def _rope_halves(v, pos, theta=10000.0):
    d = v.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * freqs, pos * freqs])
    rot = torch.cat([-v[..., d // 2:], v[..., :d // 2]], -1)
    return v * ang.cos() + rot * ang.sin()


def test_permutation_maps_interleaved_rope_to_halves():
    """P(rope_interleaved(W x)) == rope_halves(P(W) x) per head, so attention scores agree."""
    n_heads, head_dim, d = 3, 8, 16
    w = torch.randn(n_heads * head_dim, d, dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64)
    pw = permute_rope_rows(w, n_heads)
    for pos in (0, 1, 7, 100):
        a = _rope_interleaved((w @ x).view(n_heads, head_dim), pos)
        a = permute_rope_rows(a.reshape(-1, 1), n_heads).view(n_heads, head_dim)
        b = _rope_halves((pw @ x).view(n_heads, head_dim), pos)
        torch.testing.assert_close(a, b)


def test_converted_folder_greedy_generates_lily(converted, stories_source):
    """Known-good check of the data README, through transformers on the converted folder."""
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    out = m.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
    text = stories_source.tokenizer.decode(out[0].tolist())
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text


def test_converted_folder_files(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    assert (converted / "model.safetensors").is_file() and (converted / "tok512.bin").is_file()


def test_hf_folder_matches_bin(converted, stories_source, stories_tensors):
    src = open_model(converted)
    assert src.describe() == f"hf:{converted}"
    a, b = src.config, stories_source.config
    for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "head_dim",
              "norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings", "qkv_bias",
              "activation", "bos_token_id", "eos_token_ids"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.arch == "llama"
    assert isinstance(src.tokenizer, Llama2cTokenizer)  # tok512.bin copied in by llama2c_to_hf
    got = dict(src.tensors())
    assert list(got) == list(stories_tensors)
    for k, v in stories_tensors.items():
        assert torch.equal(got[k], v), k


def test_sharded_folder(converted, stories_tensors, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(converted / "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(converted / "config.json", tmp_path)
    got = dict(open_model(tmp_path, tokenizer=converted / "tok512.bin").tensors())
    assert list(got) == list(stories_tensors)
    assert all(torch.equal(got[k], v) for k, v in stories_tensors.items())
    # a shard listed in the index but missing
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model file not found: .*model-00002-of-00002"):
        open_model(tmp_path, tokenizer=converted / "tok512.bin")


def test_qwen2_folder_with_bias_and_untied_head(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=[2, 5], max_position_embeddings=256)
    model = Qwen2ForCausalLM(hf_cfg)
    model.save_pretrained(tmp_path)
    tok = need_data(sdata.STORIES260K_TOKENIZER)
    src = open_model(tmp_path, tokenizer=tok)
    c = src.config
    assert c.arch == "qwen2" and c.qkv_bias and not c.tie_embeddings
    assert c.head_dim == 8 and c.max_seq_len == 256 and c.eos_token_ids == [2, 5]
    got = dict(src.tensors())
    assert set(got) == set(expected_shapes(c))
    ref = model.state_dict()
    assert torch.equal(got["layers.1.bk"], ref["model.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(got["layers.0.wq"], ref["model.layers.0.self_attn.q_proj.weight"])  # no permutation
    assert torch.equal(got["lm_head"], ref["lm_head.weight"])
    assert torch.equal(got["layers.1.w_down"], ref["model.layers.1.mlp.down_proj.weight"])


# ---- config translation --------------------------------------------------------------------------

BASE = dict(model_type="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
            num_hidden_layers=2, intermediate_size=128, vocab_size=100, rms_norm_eps=1e-5)


def test_config_rope_llama3_both_styles():
    rp = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)
    new = hf_config_to_model_config({**BASE, "rope_parameters": {**rp, "rope_theta": 500000.0}}, "x")
    old = hf_config_to_model_config({**BASE, "rope_theta": 500000.0, "rope_scaling": dict(rp)}, "x")
    for c in (new, old):
        assert c.rope_theta == 500000.0
        assert c.rope_scaling == rp
    default = hf_config_to_model_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}, "x")
    assert default.rope_theta == 1e5 and default.rope_scaling is None
    with pytest.raises(ModelFormatError, match="RoPE scaling type 'yarn' is not supported"):
        hf_config_to_model_config({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "x")


def test_config_activation_eos_and_arch():
    c = hf_config_to_model_config({**BASE, "hidden_act": "gelu_pytorch_tanh", "eos_token_id": [7, 8]}, "x",
                                  extra_eos_ids=[8, 9])
    assert c.activation == "gelu_tanh" and c.eos_token_ids == [7, 8, 9]
    c = hf_config_to_model_config({**BASE, "hidden_act": "fatrelu", "hidden_act_param": 0.1}, "x")
    assert c.activation == "fatrelu" and c.activation_param == pytest.approx(0.1)
    assert hf_config_to_model_config({**BASE, "hidden_act": "relu"}, "x").activation == "relu"
    assert hf_config_to_model_config({**BASE, "model_type": "mistral"}, "x").arch == "mistral"
    assert hf_config_to_model_config({**BASE, "model_type": "qwen2"}, "x").qkv_bias
    with pytest.raises(ModelFormatError, match="activation 'tanh'"):
        hf_config_to_model_config({**BASE, "hidden_act": "tanh"}, "x")


# ---- errors --------------------------------------------------------------------------------------

def test_error_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found: .*nothing-here"):
        open_model(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        open_model("not-a-real-alias")


def test_error_empty_folder(tmp_path):
    with pytest.raises(ModelFormatError, match="no model found in .*config.json \\+ \\*.safetensors"):
        open_model(tmp_path)


def test_error_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(ModelFormatError, match="no \\*.safetensors weights"):
        open_model(tmp_path)


def test_error_unsupported_architecture(converted, tmp_path):
    shutil.copy(converted / "model.safetensors", tmp_path)
    cfg = json.loads((converted / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2' \\(supported: llama"):
        open_model(tmp_path)


def test_error_llama2c_without_tokenizer(stories_bin, tmp_path):
    lone = tmp_path / "model.bin"
    shutil.copy(stories_bin, lone)
    with pytest.raises(FileNotFoundError, match="no llama2.c tokenizer \\(tok\\*.bin\\) found beside .*tokenizer="):
        open_model(lone)
    src = open_model(lone, tokenizer=need_data(sdata.STORIES260K_TOKENIZER))  # the fix the message names
    assert src.tokenizer.vocab_size == 512
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        open_model(lone, tokenizer=tmp_path / "tok999.bin")


def test_error_llama2c_size_mismatch(stories_bin, tmp_path):
    bad = tmp_path / "cut.bin"
    bad.write_bytes(stories_bin.read_bytes()[:-4])
    shutil.copy(need_data(sdata.STORIES260K_TOKENIZER), tmp_path)
    with pytest.raises(ModelFormatError, match="is 1056536 bytes but its header .* implies 1056540 bytes"):
        open_model(bad)
    assert read_header(stories_bin).expected_bytes() == stories_bin.stat().st_size


def test_error_folder_with_two_ggufs(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelFormatError, match="several .gguf files"):
        open_model(tmp_path)


def test_error_not_a_gguf(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"NOPE" * 10)
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        open_model(f)


# ---- GGUF (SmolLM2-135M-Instruct) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return open_model(smollm2_gguf())


def test_gguf_config(smol):
    c = smol.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (576, 30, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size) == (1536, 49152)
    assert c.tie_embeddings and not c.qkv_bias and c.activation == "silu"
    assert c.rope_theta == 1e5 and c.rope_scaling is None
    assert c.norm_eps == pytest.approx(1e-5) and c.arch == "llama"
    assert c.bos_token_id == 1 and 2 in c.eos_token_ids
    assert smol.describe() == f"gguf:{smollm2_gguf()}"


def test_gguf_tokenizer(smol):
    tok = smol.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 49152
    assert tok.has_chat_template()
    assert tok.encode("Hello world") == [19556, 905]  # no BOS, as transformers' tokenizer(text)
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_alias_resolves_to_package_gguf():
    from sparsedge.loading import resolve_alias

    assert resolve_alias("smollm2-135m") == smollm2_gguf()
    assert resolve_alias("SmolLM2-135M") == smollm2_gguf()


@pytest.mark.slow
def test_gguf_tensors_match_transformers(smol):
    """All tensors (dequantized once) against transformers' own GGUF model."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    want = expected_shapes(smol.config)
    seen = []
    for name, t in smol.tensors():
        assert tuple(t.shape) == want[name] and t.dtype == torch.float32
        hf = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight"}.get(name)
        if hf is None:
            from sparsedge.loading.llama2c import canonical_to_hf_name
            hf = canonical_to_hf_name(name)
        assert torch.equal(t, ref[hf]), name
        seen.append(name)
    assert seen == list(want)
