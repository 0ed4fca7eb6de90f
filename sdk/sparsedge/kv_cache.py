"""The dense, preallocated KV cache (static shapes, gpt-fast style).

A cache is a list of per-layer caches with one method the attention calls:
    attend(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], start) -> out [T, Hq, D]
which stores k, v at positions start..start+T-1 and attends causally over positions 0..start+T-1 (a layer with a
sliding window W, SlidingLayerCache: over the last W positions of each query, its own included).
The delta-buffer cache (sparsedge.delta) implements the same protocol.
"""
from __future__ import annotations

import torch

from sparsedge.config import ModelConfig


class DenseLayerCache:
    def __init__(self, config: ModelConfig, max_seq_len: int, dtype: torch.dtype, device):
        shape = (config.n_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scale = config.attention_scale  # head_dim ** -0.5 unless the model says otherwise (Gemma)
        self.length = 0

    def store(self, k: torch.Tensor, v: torch.Tensor, start: int) -> int:
        """Write k, v [T, H, D] at positions start..; returns the new length."""
        n = start + k.shape[0]
        self.k[:, start:n] = k.transpose(0, 1)
        self.v[:, start:n] = v.transpose(0, 1)
        self.length = n
        return n

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        self.store(k, v, start)
        return torch.ops.sparsedge.dense_attention(q, self.k, self.v, start, self.scale)

    def truncate(self, n: int) -> bool:
        self.length = min(self.length, n)
        return True

    def k_bytes(self) -> int:
        """K-side bytes holding the cached tokens."""
        return self.length * self.k.shape[0] * self.k.shape[2] * self.k.element_size()

    def dense_k_bytes(self) -> int:
        return self.k_bytes()


class SlidingLayerCache(DenseLayerCache):
    """DenseLayerCache of a sliding-window layer: the query at position p attends to positions p-W+1..p only
    (sparsedge::dense_attention_window once the context is longer than W; dense_attention before). Keeps every
    position (so truncate stays exact); the attention reads at most W of them."""

    def __init__(self, config: ModelConfig, max_seq_len: int, dtype: torch.dtype, device, window: int):
        super().__init__(config, max_seq_len, dtype, device)
        if window <= 0:
            raise ValueError(f"sliding window must be > 0, got {window}")
        self.window = int(window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        n = self.store(k, v, start)
        if n <= self.window:
            return torch.ops.sparsedge.dense_attention(q, self.k, self.v, start, self.scale)
        return torch.ops.sparsedge.dense_attention_window(q, self.k, self.v, start, self.scale, self.window)


def layer_cache(config: ModelConfig, layer: int, max_seq_len: int, dtype: torch.dtype, device) -> DenseLayerCache:
    """The dense cache of one layer: sliding when the config gives the layer a window."""
    w = config.window(layer)
    if w:
        return SlidingLayerCache(config, max_seq_len, dtype, device, w)
    return DenseLayerCache(config, max_seq_len, dtype, device)


class KVCache:
    def __init__(self, layers: list, max_seq_len: int):
        self.layers = layers
        self.max_seq_len = max_seq_len

    @classmethod
    def dense(cls, config: ModelConfig, max_seq_len: int, dtype: torch.dtype, device) -> "KVCache":
        return cls([layer_cache(config, i, max_seq_len, dtype, device) for i in range(config.n_layers)], max_seq_len)

    def truncate(self, n: int) -> bool:
        """Forget positions >= n; False when a layer cannot (the caller then re-prefills)."""
        return all(layer.truncate(n) for layer in self.layers)

    def k_bytes(self) -> int:
        return sum(layer.k_bytes() for layer in self.layers)

    def dense_k_bytes(self) -> int:
        return sum(layer.dense_k_bytes() for layer in self.layers)
