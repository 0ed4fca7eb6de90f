"""Model configuration shared by every loader, the decoder and the kernels.

One dataclass describes every Llama-family model we run: Llama 2/3, Mistral, Qwen2 (qkv bias),
SmolLM2, llama2.c checkpoints. Loaders translate their source format into it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from sparsedge.activations import check_activation


SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "smollm2", "llama2c")


class UnsupportedArchitectureError(ValueError):
    pass


def check_architecture(arch: str) -> None:
    if arch.lower() not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            "sparsedge runs Llama-family decoders only"
        )


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": .., ...} or None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    activation: str = "silu"
    activation_param: float = 0.0  # fatrelu threshold
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=list)
    arch: str = "llama"
    name: str = "model"

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        check_activation(self.activation)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        check_architecture(self.arch)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
