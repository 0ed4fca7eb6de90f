"""The lean decoder against transformers on small random models: Llama (GQA, tied and untied, llama3 RoPE
scaling), Qwen2 (qkv bias), and every FFN activation against its definition."""
from __future__ import annotations

import pytest
import torch

from sparsedge.backends import get_backend
from sparsedge.config import ModelConfig
from sparsedge.kv_cache import KVCache
from sparsedge.loading.build import build_transformer

transformers = pytest.importorskip("transformers")


class DictSource:
    """A ModelSource over an in-memory state dict already in canonical names."""

    def __init__(self, config, tensors):
        self.config, self._tensors = config, tensors

    def tensors(self):
        yield from self._tensors.items()

    def describe(self):
        return "test-dict"


def hf_to_canonical(sd: dict, tied: bool) -> dict:
    from sparsedge.loading.hf import hf_to_canonical as name_of

    out = {name_of(k): v for k, v in sd.items() if name_of(k) is not None}
    if tied:
        out.pop("lm_head", None)
    return out


def make_pair(kind="llama", tied=False, rope_scaling=None, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if kind == "qwen2":
        hf_cfg = transformers.Qwen2Config(rope_theta=10000.0, **common)
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
    else:
        rp = {"rope_type": "default", "rope_theta": 500000.0}
        if rope_scaling:
            rp = {**rope_scaling, "rope_theta": 500000.0}
        hf_cfg = transformers.LlamaConfig(rope_parameters=rp, **common)
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf = hf.eval().float()
    with torch.no_grad():  # random norms so the norm weights matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0, 0.5)
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=96,
                      rope_theta=10000.0 if kind == "qwen2" else 500000.0, rope_scaling=rope_scaling,
                      max_seq_len=256, tie_embeddings=tied, qkv_bias=kind == "qwen2", arch=kind)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    ours = build_transformer(DictSource(cfg, hf_to_canonical(sd, tied)), get_backend("cpu"), torch.float32,
                             progress=False)
    ours.ensure_rope(256)
    return hf, ours


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("kind,tied,scaling", [("llama", False, None), ("llama", True, None),
                                                ("llama", False, LLAMA3), ("qwen2", False, None)])
def test_logits_match_transformers_prefill_and_decode(kind, tied, scaling):
    hf, ours = make_pair(kind, tied, scaling)
    ids = torch.randint(0, 97, (40,))
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
        cache = KVCache.dense(ours.config, 64, torch.float32, "cpu")
        # prefill 30 tokens, then decode the rest one at a time through the same cache
        got = [ours(ids[:30], 0, cache, all_logits=True)]
        for t in range(30, 40):
            got.append(ours(ids[t:t + 1], t, cache))
    got = torch.cat(got)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "fatrelu", "drelu", "relu2"])
def test_dense_ffn_activations_follow_definitions(activation):
    from sparsedge.model import DenseFFN

    cfg = ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=24,
                      activation=activation, activation_param=0.1)
    wg, wu, wd = torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)
    ffn = DenseFFN(cfg, torch.cat([wg, wu]), wd.t().contiguous())
    x = torch.randn(5, 16)
    g, u = x @ wg.t(), x @ wu.t()
    act = {"silu": torch.nn.functional.silu(g), "gelu": torch.nn.functional.gelu(g),
           "gelu_tanh": torch.nn.functional.gelu(g, approximate="tanh"), "relu": g.relu(),
           "fatrelu": torch.where(g > 0.1, g, 0.0), "drelu": g.relu(), "relu2": g.relu() ** 2}[activation]
    h = act * (u.relu() if activation == "drelu" else u)
    assert torch.allclose(ffn(x), h @ wd.t(), atol=1e-4)


def test_unknown_activation_and_architecture_are_refused():
    from sparsedge.config import UnsupportedArchitectureError

    with pytest.raises(ValueError, match="unknown FFN activation 'swish2'"):
        ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=24,
                    activation="swish2")
    with pytest.raises(UnsupportedArchitectureError, match=r"unsupported architecture 'gpt2' \(supported: llama"):
        ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=24, arch="gpt2")


def test_fused_cpu_norm_and_rope_match_reference():
    from sparsedge import ops

    x, w, res = torch.randn(7, 576), torch.rand(576) + 0.5, torch.randn(7, 576)
    assert torch.allclose(torch.ops.sparsedge.rms_norm(x, w, 1e-5), ops.reference("rms_norm")(x, w, 1e-5), atol=1e-5)
    r1, r2 = res.clone(), res.clone()
    y1 = torch.ops.sparsedge.add_rms_norm(r1, x, w, 1e-5)
    y2 = ops.reference("add_rms_norm")(r2, x, w, 1e-5)
    assert torch.allclose(r1, r2) and torch.allclose(y1, y2, atol=1e-5)
    q, c, s = torch.randn(3, 12, 64), torch.randn(3, 32), torch.randn(3, 32)
    assert torch.allclose(torch.ops.sparsedge.rope(q, c, s), ops.reference("rope")(q, c, s), atol=1e-5)
    xb = x.bfloat16()
    assert torch.allclose(torch.ops.sparsedge.rms_norm(xb, w, 1e-5).float(),
                          ops.reference("rms_norm")(xb, w, 1e-5).float(), atol=2e-2)
    assert ops.has_fused("rms_norm", "cpu"), "the CPU kernel library was not built or not loaded"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("T", [1, 3, 8, 9])
@pytest.mark.parametrize("K,N", [(576, 960), (37, 70), (64, 5)])
def test_fused_linear_ops_match_reference(dtype, tol, T, K, N):
    from sparsedge import ops

    x = torch.randn(T, K).to(dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(dtype)
    b = torch.randn(N).to(dtype)
    w_t = (torch.randn(K, N) / K ** 0.5).to(dtype)
    for got, want in [(torch.ops.sparsedge.linear(x, w, b), ops.reference("linear")(x.float(), w.float(), b.float())),
                      (torch.ops.sparsedge.linear(x, w), ops.reference("linear")(x.float(), w.float())),
                      (torch.ops.sparsedge.linear_t(x, w_t), ops.reference("linear_t")(x.float(), w_t.float()))]:
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.allclose(got.float(), want, atol=tol * 4, rtol=tol), (got.float() - want).abs().max()
    assert ops.has_fused("linear", "cpu") and ops.has_fused("linear_t", "cpu")
