"""The lean Llama-family decoder (gpt-fast style): embeddings, N x (attention, FFN), norm, lm_head.

Weights live in the layout the kernels want:
  attention: wqkv [(Hq + 2 Hkv) D, d] (one GEMV for q, k, v), optional bqkv, wo [d, Hq D]
  FFN:       w_gate_up [2I, d] (rows 0..I-1 gate, I..2I-1 up; each half a contiguous [I, d] row block),
             w_down_t [I, d] (W_down transposed, so a neuron's down weights are one contiguous row)
Every residual add is fused with the following RMSNorm (sparsedge::add_rms_norm).

Every module counts its own work (sparsedge.stats: `stats()` / `reset_stats()`, weight bytes it read), with
in-place int lists so the decode step pays no nn.Module attribute machinery for it.

Models with pieces beyond Llama's (Qwen3, Gemma 3, Phi-3, BitNet; see sparsedge.config) use the subclasses
ExtendedAttention / SubNormFFN and Transformer's general path, chosen once when the model is built; a Llama-family
model runs exactly the lean code above them (Transformer.forward branches once per call).

The two places sparsity plugs in:
  - `Block.ffn` is any module mapping x [T, d] -> [T, d]; DenseFFN here, SparseFFN in sparsedge.ffn.
  - attention hands q, k, v to its per-layer cache (`LayerCache.attend`), so the dense cache in
    sparsedge.kv_cache and the delta-buffer cache in sparsedge.delta are interchangeable.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsedge.config import ModelConfig
from sparsedge.quant.qweight import QWeight, nbytes
from sparsedge.quant.ternary import TernaryWeight
from sparsedge.activations import activate

ops = torch.ops.sparsedge


def _zero_counts(module, n: int) -> None:
    """module._n = [0] * n, in place after the first time (sparsedge.fused_step holds the lists it updates)."""
    counts = module.__dict__.get("_n")
    if counts is None:
        module._n = [0] * n
    else:
        counts[:] = [0] * n


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) for a weight held as a float tensor, a QWeight (its own blocks), a TernaryWeight (BitNet
    b1.58's BitLinear: x rounded to int8 per token, sparsedge::bitlinear), or a tuple of them (row blocks of one
    projection whose formats differ, e.g. q/k/v of a Q4_K_M file)."""
    if isinstance(w, QWeight):
        y = ops.qlinear(x, w.data, w.qtype, w.K)
        return y if b is None else y + b
    if isinstance(w, TernaryWeight):
        y = ops.bitlinear(x, w.data, w.scale)
        return y if b is None else y + b
    if isinstance(w, tuple):
        y = torch.cat([linear(x, p) for p in w], -1)
        return y if b is None else y + b
    return ops.linear(x, w, b)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, computed as transformers computes them. `local`: those of the sliding
    layers (config.rope_local_theta, unscaled). Partial rotary (config.rotary_dim R < D): the first R/2 are RoPE's
    over R channels, the rest 0 (cos 1, sin 0: those channels pass through; loaders put the rotated channels
    first in each half of a head, see sparsedge.loading.base)."""
    D = config.head_dim
    R = config.rotary_dim or D
    theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.int64).float() / R))
    if R < D:
        inv = torch.cat([inv, torch.zeros((D - R) // 2)])
    rs = None if local and config.rope_local_theta else config.rope_scaling
    kind = (rs or {}).get("rope_type", (rs or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "llama3":
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported RoPE scaling {kind!r} (supported: default, linear, llama3)")


def rope_tables(config: ModelConfig, max_seq_len: int, device=None, local: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, D/2] in fp32 (computed as transformers does, so parity is exact)."""
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(config, local))
    return freqs.cos().to(device), freqs.sin().to(device)


class DenseFFN(nn.Module):
    """h = act(W_gate x) * (W_up x); y = W_down h.

    Float weights: W_down stored transposed (w_down_t [I, d], a neuron's down weights one contiguous row, what
    the sparse kernels gather). Quantized weights (QWeight, or BitNet's TernaryWeight): W_down kept as the file has
    it (w_down [d, I]) and run by qlinear / bitlinear; w_gate_up is one QWeight (TernaryWeight), or a (gate, up)
    tuple when the file stores them in two formats."""

    def __init__(self, config: ModelConfig, w_gate_up, w_down_t: torch.Tensor | None,
                 w_down: QWeight | TernaryWeight | None = None):
        super().__init__()
        self.I = config.intermediate_size
        self.activation, self.act_param = config.activation, config.activation_param
        self.tau = 0.0  # CATS-style threshold for silu/gelu (set by FFN calibration)
        self.w_gate_up = w_gate_up
        self.w_down_t = w_down_t
        self.w_down = w_down
        self.reset_stats()

    @property
    def quantized(self) -> bool:
        return self.w_down_t is None

    @property
    def w_gate(self):
        w = self.w_gate_up
        if isinstance(w, tuple):
            return w[0]
        return w[: self.I] if isinstance(w, torch.Tensor) else w.rows(slice(0, self.I))

    @property
    def w_up(self):
        w = self.w_gate_up
        if isinstance(w, tuple):
            return w[1]
        return w[self.I:] if isinstance(w, torch.Tensor) else w.rows(slice(self.I, None))

    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate pre-activation, down-projection input h), both [T, I]; used by calibration too."""
        gu = linear(x, self.w_gate_up)
        g, u = gu[:, : self.I], gu[:, self.I:]
        if self.activation == "silu" and self.tau == 0.0:
            return g, F.silu(g) * u
        if x.dtype == torch.float32:
            return g, activate(g, u, self.activation, self.act_param, self.tau)
        return g, activate(g.float(), u.float(), self.activation, self.act_param, self.tau).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self._n
        n[0] += 1
        n[1] += x.shape[0]
        h = self.hidden(x)[1]
        return linear(h, self.w_down) if self.w_down_t is None else ops.linear_t(h, self.w_down_t)

    def weight_bytes(self) -> int:
        return nbytes(self.w_gate_up) + nbytes(self.w_down_t) + nbytes(self.w_down)

    def reset_stats(self) -> None:
        _zero_counts(self, 2)  # calls, tokens

    def stats(self) -> dict:
        calls, tokens = self._n
        rows = tokens * self.I
        return {"weight_bytes": calls * self.weight_bytes(), "ffn_neurons": rows, "ffn_predicted": rows,
                "ffn_gate_up_rows": rows, "ffn_down_rows": rows}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, wqkv: torch.Tensor, bqkv: torch.Tensor | None, wo: torch.Tensor):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.wqkv, self.bqkv, self.wo = wqkv, bqkv, wo
        self.reset_stats()

    def forward(self, x, cos, sin, layer_cache, start: int):
        T = x.shape[0]
        self._n[0] += 1
        qkv = linear(x, self.wqkv, self.bqkv)
        qk = qkv[:, : self.q_size + self.kv_size].reshape(T, self.n_heads + self.n_kv_heads, self.head_dim)
        qk = ops.rope(qk, cos, sin)  # one fused call rotates q and k together
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads:]
        v = qkv[:, self.q_size + self.kv_size:].reshape(T, self.n_kv_heads, self.head_dim)
        out = layer_cache.attend(q, k, v, start)  # [T, Hq, D]
        return linear(out.reshape(T, self.q_size), self.wo)

    def weight_bytes(self) -> int:
        return nbytes(self.wqkv) + nbytes(self.wo) + nbytes(self.bqkv)

    def reset_stats(self) -> None:
        _zero_counts(self, 1)  # calls

    def stats(self) -> dict:
        return {"weight_bytes": self._n[0] * self.weight_bytes()}


class ExtendedAttention(Attention):
    """Attention with the pieces beyond Llama: per-head RMSNorm of q and of k before RoPE (`q_norm`, `k_norm`
    [head_dim]; Qwen3, Gemma 3) and RMSNorm of the attention output before W_o (`sub_norm` [Hq D]; BitNet).
    The attention scale and the sliding window live in the layer's cache (sparsedge.kv_cache)."""

    def __init__(self, config: ModelConfig, wqkv, bqkv, wo, q_norm: torch.Tensor | None = None,
                 k_norm: torch.Tensor | None = None, sub_norm: torch.Tensor | None = None):
        super().__init__(config, wqkv, bqkv, wo)
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm come together")
        self.q_norm, self.k_norm, self.sub_norm = q_norm, k_norm, sub_norm
        self.eps = config.norm_eps

    def forward(self, x, cos, sin, layer_cache, start: int):
        T = x.shape[0]
        self._n[0] += 1
        qkv = linear(x, self.wqkv, self.bqkv)
        Hq, Hkv, D, nqk = self.n_heads, self.n_kv_heads, self.head_dim, self.q_size + self.kv_size
        if self.q_norm is None:
            qk = qkv[:, :nqk].reshape(T, Hq + Hkv, D)
        else:
            q = ops.rms_norm(qkv[:, : self.q_size].reshape(T, Hq, D), self.q_norm, self.eps)
            k = ops.rms_norm(qkv[:, self.q_size:nqk].reshape(T, Hkv, D), self.k_norm, self.eps)
            qk = torch.cat((q, k), 1)
        qk = ops.rope(qk, cos, sin)
        q, k = qk[:, :Hq], qk[:, Hq:]
        v = qkv[:, nqk:].reshape(T, Hkv, D)
        out = layer_cache.attend(q, k, v, start).reshape(T, self.q_size)
        if self.sub_norm is not None:
            out = ops.rms_norm(out, self.sub_norm, self.eps)
        return linear(out, self.wo)

    def weight_bytes(self) -> int:
        return super().weight_bytes() + nbytes(self.q_norm) + nbytes(self.k_norm) + nbytes(self.sub_norm)


class SubNormFFN(DenseFFN):
    """DenseFFN with BitNet's RMSNorm of h = act(W_gate x) * (W_up x) before W_down (`sub_norm` [I]). `hidden`
    returns the normalised h (a neuron whose h is zero stays zero), so forward and calibration see what W_down
    reads. The sparse FFN path does not implement the norm (sparsedge.ffn refuses it)."""

    def __init__(self, *args, sub_norm: torch.Tensor, eps: float, **kw):
        super().__init__(*args, **kw)
        self.sub_norm, self.eps = sub_norm, eps

    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, h = super().hidden(x)
        return g, ops.rms_norm(h, self.sub_norm, self.eps)

    def weight_bytes(self) -> int:
        return super().weight_bytes() + nbytes(self.sub_norm)


class Block(nn.Module):
    def __init__(self, attn_norm, attention: Attention, ffn_norm, ffn: nn.Module):
        super().__init__()
        self.attn_norm, self.ffn_norm = attn_norm, ffn_norm
        self.attention, self.ffn = attention, ffn
        # beyond Llama (set by the builder; Transformer's general path reads them): RMSNorm of the attention / FFN
        # output before its residual add (Gemma 3), and whether the layer uses the sliding layers' RoPE tables
        self.post_attn_norm = self.post_ffn_norm = None
        self.local_rope = False


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, tok_embeddings, layers: list[Block], norm, lm_head):
        super().__init__()
        self.config = config
        self.tok_embeddings, self.norm, self.lm_head = tok_embeddings, norm, lm_head
        self.layers = nn.ModuleList(layers)
        self.rope_cos = self.rope_sin = None
        self.rope_local = None  # (cos, sin) of the sliding layers with their own RoPE base (Gemma 3)
        # the general path is for what lives outside attention, FFN and cache (q/k norms, sub-norms, windows,
        # partial rotary and the attention scale run in the lean path too)
        self._plain = not (config.embed_scale or config.post_norms or config.final_logit_softcap
                           or (config.rope_local_theta and config.sliding_layers))
        self._embed_scale = None  # config.embed_scale as a tensor of the embeddings' dtype (made on first use)
        self.reset_stats()

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.dtype

    def ensure_rope(self, max_seq_len: int) -> None:
        if self.rope_cos is None or self.rope_cos.shape[0] < max_seq_len:
            self.rope_cos, self.rope_sin = rope_tables(self.config, max_seq_len, self.device)
            if self.config.rope_local_theta and self.config.sliding_layers:
                self.rope_local = rope_tables(self.config, max_seq_len, self.device, local=True)

    def forward(self, tokens: torch.Tensor, start: int, cache, all_logits: bool = False,
                hidden_hook=None) -> torch.Tensor:
        """tokens [T] at positions start..start+T-1 -> logits [T, V] (or [1, V] for the last token).

        `hidden_hook(layer_index, h)`, if given, sees each FFN input (used by calibration)."""
        if not self._plain:
            return self._forward_general(tokens, start, cache, all_logits, hidden_hook)
        T = tokens.shape[0]
        n = self._n
        n[0] += 1
        n[1] += T
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        eps = self.config.norm_eps
        emb = self.tok_embeddings
        residual = emb.rows(tokens).dequantize() if isinstance(emb, QWeight) else F.embedding(tokens, emb)
        h = ops.rms_norm(residual, self.layers[0].attn_norm, eps)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            a = layer.attention(h, cos, sin, cache.layers[i], start)
            h = ops.add_rms_norm(residual, a, layer.ffn_norm, eps)
            if hidden_hook is not None:
                hidden_hook(i, h)
            f = layer.ffn(h)
            next_norm = self.layers[i + 1].attn_norm if i + 1 < n else self.norm
            h = ops.add_rms_norm(residual, f, next_norm, eps)
        if not all_logits:
            h = h[-1:]
        return linear(h, self.lm_head)

    def _embedding_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """config.embed_scale rounded to `dtype` first, as transformers' Gemma does (sqrt(3072) is 55.5 in bf16)."""
        s = self._embed_scale
        if s is None or s.dtype != dtype:
            s = self._embed_scale = torch.tensor(self.config.embed_scale, dtype=torch.float32).to(dtype)
        return s

    def _forward_general(self, tokens, start: int, cache, all_logits: bool, hidden_hook) -> torch.Tensor:
        """forward for models with pieces beyond Llama: scaled embeddings, per-layer RoPE tables, norms after
        attention and FFN, final logit softcapping (the rest is in ExtendedAttention / SubNormFFN / the caches)."""
        T = tokens.shape[0]
        n = self._n
        n[0] += 1
        n[1] += T
        cfg = self.config
        cs = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        local = (self.rope_local[0][start:start + T], self.rope_local[1][start:start + T]) if self.rope_local else cs
        eps = cfg.norm_eps
        emb = self.tok_embeddings
        residual = emb.rows(tokens).dequantize() if isinstance(emb, QWeight) else F.embedding(tokens, emb)
        if cfg.embed_scale:
            residual = residual * self._embedding_scale(residual.dtype)
        h = ops.rms_norm(residual, self.layers[0].attn_norm, eps)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            cos, sin = local if layer.local_rope else cs
            a = layer.attention(h, cos, sin, cache.layers[i], start)
            if layer.post_attn_norm is not None:
                a = ops.rms_norm(a, layer.post_attn_norm, eps)
            h = ops.add_rms_norm(residual, a, layer.ffn_norm, eps)
            if hidden_hook is not None:
                hidden_hook(i, h)
            f = layer.ffn(h)
            if layer.post_ffn_norm is not None:
                f = ops.rms_norm(f, layer.post_ffn_norm, eps)
            next_norm = self.layers[i + 1].attn_norm if i + 1 < n else self.norm
            h = ops.add_rms_norm(residual, f, next_norm, eps)
        if not all_logits:
            h = h[-1:]
        logits = linear(h, self.lm_head)
        if cfg.final_logit_softcap:
            c = cfg.final_logit_softcap
            logits = torch.tanh(logits / c) * c
        return logits

    # --- accounting -------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of the top-level weights one call reads: lm_head and the norms (embedding row excluded)."""
        norms = self.norm.numel() + sum(2 * layer.attn_norm.numel() for layer in self.layers)
        norms += sum(t.numel() for layer in self.layers for t in (layer.post_attn_norm, layer.post_ffn_norm)
                     if t is not None)
        return nbytes(self.lm_head) + norms * self.norm.element_size()

    def reset_stats(self) -> None:
        _zero_counts(self, 2)  # calls, tokens

    def stats(self) -> dict:
        calls, tokens = self._n
        return {"tokens": tokens, "weight_bytes": calls * self.weight_bytes()}

    def dense_weight_bytes_per_token(self) -> int:
        """Bytes of weights one dense decode step reads (embedding row excluded)."""
        return self.weight_bytes() + sum(layer.attention.weight_bytes() + getattr(layer.ffn, "dense", layer.ffn).weight_bytes()
                                         for layer in self.layers)
