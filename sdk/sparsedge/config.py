"""Model configuration shared by every loader, the decoder and the kernels.

One dataclass describes every decoder we run: Llama 2/3, Mistral, Qwen2 (qkv bias), SmolLM2, llama2.c
checkpoints, and the Llama variants with extra pieces: Qwen3 (per-head q/k norms), Gemma 3 (q/k norms, norms
after attention and FFN, scaled embeddings, query_pre_attn_scalar, interleaved sliding-window layers with their
own RoPE base, final logit softcapping), Phi-3 (partial rotary) and BitNet b1.58 (sub-norms before W_o and
W_down). Loaders translate their source format into it.

The fields after `name` describe those extra pieces; at their defaults the model is a plain Llama and
`to_json()` leaves them out, so the JSON (and the artifact fingerprints hashed from it) of every model that
predates them is unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from sparsedge.activations import check_activation


SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "smollm2", "llama2c", "qwen3", "gemma3", "phi3", "bitnet")


class UnsupportedArchitectureError(ValueError):
    pass


def check_architecture(arch: str) -> None:
    if arch.lower() not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            "sparsedge runs these decoders only (mixture-of-experts and other families are not implemented)"
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
    # --- beyond Llama (defaults: absent; left out of to_json() at their defaults) ----------------------
    qk_norm: bool = False  # per-head RMSNorm of q and of k (weights [head_dim]) before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False  # RMSNorm of the attention and of the FFN output before each residual add (Gemma 3)
    sub_norms: bool = False  # RMSNorm of the attention output before W_o and of h before W_down (BitNet)
    embed_scale: float = 0.0  # embeddings times this, rounded to the model dtype first (Gemma: sqrt(dim)); 0: none
    query_pre_attn_scalar: float = 0.0  # attention scale is this ** -0.5 (Gemma); 0: head_dim ** -0.5
    rotary_dim: int = 0  # RoPE on the first rotary_dim channels of each head (partial rotary); 0: head_dim
    sliding_window: int = 0  # sliding layers attend to the last sliding_window positions (their own included)
    sliding_layers: list[int] = field(default_factory=list)  # which layers slide (the rest attend to everything)
    rope_local_theta: float = 0.0  # RoPE base of the sliding layers (default RoPE, unscaled); 0: the global RoPE
    final_logit_softcap: float = 0.0  # logits = c * tanh(logits / c); 0: none

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        check_activation(self.activation)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        check_architecture(self.arch)
        if self.rotary_dim == self.head_dim:
            self.rotary_dim = 0
        if self.rotary_dim and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and within 1..head_dim={self.head_dim}")
        bad = [i for i in self.sliding_layers if not 0 <= i < self.n_layers]
        if bad or (self.sliding_layers and self.sliding_window <= 0):
            raise ValueError(f"sliding_layers {self.sliding_layers} need a sliding_window > 0 (got "
                             f"{self.sliding_window}) and layer indices below n_layers={self.n_layers}")

    def window(self, layer: int) -> int:
        """The attention window of `layer` (positions it attends to, its own included); 0: all."""
        return self.sliding_window if layer in self.sliding_layers else 0

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        for k, default in _EXTRA_DEFAULTS.items():  # absent pieces stay out: old models hash as before
            if d[k] == default:
                del d[k]
        return json.dumps(d, sort_keys=True)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


_EXTRA_DEFAULTS = {"qk_norm": False, "post_norms": False, "sub_norms": False, "embed_scale": 0.0,
                   "query_pre_attn_scalar": 0.0, "rotary_dim": 0, "sliding_window": 0, "sliding_layers": [],
                   "rope_local_theta": 0.0, "final_logit_softcap": 0.0}
