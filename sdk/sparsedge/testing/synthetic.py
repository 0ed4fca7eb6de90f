"""Randomly initialised Llama-family models built straight from sparsedge.model classes (no loader):
used by the tests (small relu-family models) and by the 1B-shape decode benchmark."""
from __future__ import annotations

import math

import torch

from sparsedge.config import ModelConfig
from sparsedge.model import Attention, Block, DenseFFN, Transformer


def random_transformer(config: ModelConfig, dtype=torch.float32, seed: int = 0, device="cpu",
                       progress: bool = False) -> Transformer:
    """Gaussian weights scaled 1/sqrt(fan_in) (so activations stay O(1) through the layers)."""
    gen = torch.Generator().manual_seed(seed)
    d, I = config.dim, config.intermediate_size

    def w(rows, cols, scale=1.0):
        t = torch.empty(rows, cols, dtype=dtype)
        # fill in row blocks to bound the fp32 temporary for bf16 models
        step = max(1, (1 << 24) // max(cols, 1))
        for r in range(0, rows, step):
            blk = torch.randn(min(step, rows - r), cols, generator=gen) * (scale / math.sqrt(cols))
            t[r:r + blk.shape[0]] = blk.to(dtype)
        return t.to(device)

    def ones(n):
        return torch.ones(n, dtype=dtype, device=device)

    layers = []
    qkv = config.q_size + 2 * config.kv_size
    it = range(config.n_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="random weights", unit="layer", leave=False)
    for _ in it:
        attn = Attention(config, w(qkv, d), torch.zeros(qkv, dtype=dtype, device=device) if config.qkv_bias else None,
                         w(d, config.q_size))
        ffn = DenseFFN(config, w(2 * I, d), w(I, d, scale=math.sqrt(d / I)))
        layers.append(Block(ones(d), attn, ones(d), ffn))
    emb = w(config.vocab_size, d, scale=math.sqrt(d))
    lm_head = emb if config.tie_embeddings else w(config.vocab_size, d)
    model = Transformer(config, emb, layers, ones(d), lm_head)
    return model


def quantize_transformer(model: Transformer, qtype: str, progress: bool = False) -> Transformer:
    """Every projection of `model` (and the embedding / LM head) in `qtype` blocks, in place, as
    Session.load(weights=qtype) keeps a float checkpoint: W_down as [d, I] blocks for qlinear."""
    from sparsedge.quant.qweight import QWeight

    it = model.layers
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"quantizing to {qtype}", unit="layer", leave=False)
    for layer in it:
        a, f = layer.attention, layer.ffn
        a.wqkv, a.wo = QWeight.quantize(a.wqkv, qtype), QWeight.quantize(a.wo, qtype)
        f.w_gate_up = QWeight.quantize(f.w_gate_up, qtype)
        f.w_down, f.w_down_t = QWeight.quantize(f.w_down_t.t().contiguous(), qtype), None
    tied = model.lm_head is model.tok_embeddings
    model.tok_embeddings = QWeight.quantize(model.tok_embeddings, qtype)
    model.lm_head = model.tok_embeddings if tied else QWeight.quantize(model.lm_head, qtype)
    return model


def tiny_config(activation: str = "relu", **kw) -> ModelConfig:
    base = dict(vocab_size=128, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=192,
                max_seq_len=256, activation=activation, name=f"tiny-{activation}", tie_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def llama_1b_config(activation: str = "relu") -> ModelConfig:
    """Llama-3.2-1B shapes: d 2048, I 8192, 16 layers, 32 q / 8 kv heads of 64, vocab 128256, tied."""
    return ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       intermediate_size=8192, rope_theta=500000.0, max_seq_len=2048, tie_embeddings=True,
                       activation=activation, name=f"synthetic-llama-1b-{activation}")


def all_keeping_predictors(model, rank: int = 4) -> dict:
    """Artifact-style tensors whose predictors mark every neuron active (bias = +1e30)."""
    out = {}
    for i, layer in enumerate(model.layers):
        I, d = layer.ffn.w_down_t.shape
        out[f"layers.{i}.p1"] = torch.zeros(rank, d)
        out[f"layers.{i}.p2"] = torch.zeros(I, rank)
        out[f"layers.{i}.bias"] = torch.full((I,), 1e30)
    return out


def all_keeping_q4_predictors(model, group: int = 16) -> dict:
    """Artifact-style 4-bit gate x up predictors (sdk/sparsedge/ffn/q4.py) that mark every neuron active (thresh -1 < |score|)."""
    from sparsedge.ffn.q4 import pack_gate_up
    out = {}
    for i, layer in enumerate(model.layers):
        q, scale = pack_gate_up(layer.ffn.w_gate, layer.ffn.w_up, group)
        out[f"layers.{i}.q"], out[f"layers.{i}.scale"] = q, scale
        out[f"layers.{i}.thresh"] = torch.full((q.shape[0],), -1.0)
    return out
