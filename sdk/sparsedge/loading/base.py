"""What every loader hands the decoder: a ModelConfig, a Tokenizer, and the weights under
canonical names, one tensor at a time.

Canonical names and shapes (transformers' Llama "rotate-half" RoPE layout for wq/wk):
  tok_embeddings [V, d]; norm [d]; lm_head [V, d] (only when not tied)
  layers.{i}.attn_norm [d]; wq [Hq*D, d]; wk [Hkv*D, d]; wv [Hkv*D, d];
  bq/bk/bv [Hq*D]/[Hkv*D]/[Hkv*D] (only when config.qkv_bias); wo [d, Hq*D];
  ffn_norm [d]; w_gate [I, d]; w_up [I, d]; w_down [d, I]
and, for the pieces beyond Llama (sparsedge.config), only when the config has them:
  q_norm, k_norm [D] (qk_norm); attn_sub_norm [Hq*D], ffn_sub_norm [I] (sub_norms);
  post_attn_norm, post_ffn_norm [d] (post_norms).
Every norm weight is the factor the normalised vector is multiplied by: Gemma's (1 + w) convention is folded in by
the loader (llama.cpp's GGUF files store 1 + w already). Partial rotary (config.rotary_dim R < D): the R rotated
channels of each q/k head are channels 0..R/2-1 and D/2..D/2+R/2-1 (each half of the head starts with its rotated
half), so the decoder's rotate-half RoPE over all D channels, with cos 1 / sin 0 past R/2, is the model's.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import torch
from loguru import logger

from sparsedge.config import ModelConfig
from sparsedge.tokenizer import Tokenizer


class ModelFormatError(ValueError):
    """A model file or folder that exists but cannot be loaded as given."""


LAYER_KEYS = ("attn_norm", "wq", "bq", "wk", "bk", "wv", "bv", "q_norm", "k_norm", "attn_sub_norm", "wo",
              "post_attn_norm", "ffn_norm", "w_gate", "w_up", "ffn_sub_norm", "w_down", "post_ffn_norm")


def extra_layer_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """The per-layer tensors beyond Llama's that `cfg` needs."""
    return ((("q_norm", "k_norm") if cfg.qk_norm else ()) + (("attn_sub_norm", "ffn_sub_norm") if cfg.sub_norms else ())
            + (("post_attn_norm", "post_ffn_norm") if cfg.post_norms else ()))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape, in the order loaders yield them."""
    d, q, kv, inter = cfg.dim, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    per_layer = {
        "attn_norm": (d,), "wq": (q, d), "bq": (q,), "wk": (kv, d), "bk": (kv,), "wv": (kv, d), "bv": (kv,),
        "wo": (d, q), "ffn_norm": (d,), "w_gate": (inter, d), "w_up": (inter, d), "w_down": (d, inter),
        "q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,), "attn_sub_norm": (q,), "ffn_sub_norm": (inter,),
        "post_attn_norm": (d,), "post_ffn_norm": (d,),
    }
    extra = set(extra_layer_keys(cfg))
    out: dict[str, tuple[int, ...]] = {"tok_embeddings": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        for k in LAYER_KEYS:
            if k in ("bq", "bk", "bv") and not cfg.qkv_bias:
                continue
            if k in _EXTRA_KEYS and k not in extra:
                continue
            out[f"layers.{i}.{k}"] = per_layer[k]
    out["norm"] = (d,)
    if not cfg.tie_embeddings:
        out["lm_head"] = (cfg.vocab_size, d)
    return out


_EXTRA_KEYS = frozenset(("q_norm", "k_norm", "attn_sub_norm", "ffn_sub_norm", "post_attn_norm", "post_ffn_norm"))


def canonical_order(names) -> list[str]:
    """Sort canonical names the way expected_shapes lists them."""
    def key(n: str):
        if n == "tok_embeddings":
            return (0, 0, 0)
        if n.startswith("layers."):
            _, i, k = n.split(".", 2)
            return (1, int(i), LAYER_KEYS.index(k) if k in LAYER_KEYS else 99)
        return (2, 0 if n == "norm" else 1, 0)
    return sorted(names, key=key)


class ModelSource(ABC):
    """A model opened for loading. `tensors()` can be iterated more than once; each pass reads
    the weights again, one tensor at a time."""

    config: ModelConfig
    path: Path

    def __init__(self, path: Path, config: ModelConfig):
        self.path = Path(path)
        self.config = config
        self._tokenizer: Tokenizer | None = None

    # The tokenizer is built on first use (a GGUF tokenizer takes seconds to parse); whether one
    # can be found is checked when the model is opened.
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
            self._tokenizer.name = self.config.name
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok: Tokenizer) -> None:
        self._tokenizer = tok

    @abstractmethod
    def _load_tokenizer(self) -> Tokenizer: ...

    @abstractmethod
    def _raw_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Canonical (name, tensor) pairs, in canonical order."""

    @abstractmethod
    def describe(self) -> str: ...

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, tensor) pairs, lazily, shapes checked against the config. Tensors come
        in the dtype they are stored in (fp32 for llama2.c and dequantized GGUF)."""
        want = expected_shapes(self.config)
        seen = set()
        for name, t in self._raw_tensors():
            if name not in want:
                if name == "lm_head" and self.config.tie_embeddings:
                    continue
                raise ModelFormatError(f"{self.describe()}: unexpected tensor {name!r} for this config")
            if tuple(t.shape) != want[name]:
                raise ModelFormatError(f"{self.describe()}: tensor {name!r} has shape {tuple(t.shape)}, "
                                       f"expected {want[name]} from the config")
            seen.add(name)
            yield name, t
        missing = [n for n in want if n not in seen]
        if missing:
            raise ModelFormatError(f"{self.describe()}: missing tensors {missing[:6]}"
                                   f"{' ...' if len(missing) > 6 else ''}")
        logger.debug("{}: yielded {} tensors", self.describe(), len(seen))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors in one dict (convenience for tests and small models)."""
        return dict(self.tensors())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
