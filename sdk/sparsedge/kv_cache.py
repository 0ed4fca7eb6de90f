"""The dense, preallocated KV cache (static shapes, gpt-fast style).

A cache is a list of per-layer caches with one method the attention calls:
    attend(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], start) -> out [T, Hq, D]
which stores k, v at positions start..start+T-1 and attends causally over positions 0..start+T-1.
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
        self.scale = config.head_dim ** -0.5
        self.length = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        T = q.shape[0]
        n = start + T
        self.k[:, start:n] = k.transpose(0, 1)
        self.v[:, start:n] = v.transpose(0, 1)
        self.length = n
        return torch.ops.sparsedge.dense_attention(q, self.k, self.v, start, self.scale)

    def truncate(self, n: int) -> bool:
        self.length = min(self.length, n)
        return True

    def k_bytes(self) -> int:
        """K-side bytes holding the cached tokens."""
        return self.length * self.k.shape[0] * self.k.shape[2] * self.k.element_size()

    def dense_k_bytes(self) -> int:
        return self.k_bytes()


class KVCache:
    def __init__(self, layers: list, max_seq_len: int):
        self.layers = layers
        self.max_seq_len = max_seq_len

    @classmethod
    def dense(cls, config: ModelConfig, max_seq_len: int, dtype: torch.dtype, device) -> "KVCache":
        return cls([DenseLayerCache(config, max_seq_len, dtype, device) for _ in range(config.n_layers)],
                   max_seq_len)

    def truncate(self, n: int) -> bool:
        """Forget positions >= n; False when a layer cannot (the caller then re-prefills)."""
        return all(layer.truncate(n) for layer in self.layers)

    def k_bytes(self) -> int:
        return sum(layer.k_bytes() for layer in self.layers)

    def dense_k_bytes(self) -> int:
        return sum(layer.dense_k_bytes() for layer in self.layers)
