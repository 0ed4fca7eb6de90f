"""llama2.c checkpoints (legacy version-0 `.bin`): header of 7 int32, then fp32 arrays.

llama2.c rotates interleaved pairs (0,1),(2,3)... of each head; transformers' Llama rotates halves
(i, i+D/2). `permute_rope_rows` reorders the rows of wq/wk per head so that the halves layout
computes the same attention.
"""
from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from loguru import logger

from sparsedge.config import ModelConfig
from sparsedge.tokenizer import Tokenizer
from sparsedge.loading.base import ModelFormatError, ModelSource
from sparsedge.loading.hf import _LAYER_MAP as _HF_LAYER_MAP

HEADER_BYTES = 7 * 4
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer export versions


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # absolute value
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(array name, shape) in file order, fp32."""
        d, h, L, V, kv = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        out = [
            ("token_embedding", (V, d)),
            ("rms_att", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("rms_ffn", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            out.append(("wcls", (V, d)))
        return out

    def expected_bytes(self) -> int:
        return HEADER_BYTES + 4 * sum(int(np.prod(s)) for _, s in self.layout())


def read_header(path: str | os.PathLike) -> Llama2cHeader:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ModelFormatError(f"{path} is {size} bytes, too short for a llama2.c checkpoint header")
    vals = struct.unpack("<7i", raw)
    if vals[0] == _MAGIC_V1:
        raise ModelFormatError(f"{path} is a llama2.c version-{vals[1]} export; only the legacy version-0 "
                               "format is supported (re-export it with `export.py --version 0`)")
    if raw[:2] == b"PK":
        raise ModelFormatError(f"{path} is a zip archive (a PyTorch pytorch_model.bin?), not a llama2.c "
                               "checkpoint; load its transformers folder instead (config.json + safetensors)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = vals
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab == 0 or dim % n_heads \
            or n_heads % n_kv or (dim // n_heads) % 2:
        raise ModelFormatError(f"{path}: header {vals} is not a valid llama2.c checkpoint header "
                               "(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)")
    hdr = Llama2cHeader(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, vocab > 0)
    want = hdr.expected_bytes()
    if size != want:
        raise ModelFormatError(
            f"{path} is {size} bytes but its header (dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, "
            f"n_heads={n_heads}, n_kv_heads={n_kv}, vocab_size={vocab}, seq_len={seq_len}) implies {want} bytes; "
            "the file is truncated or not a legacy (version 0) llama2.c checkpoint")
    return hdr


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved-pair RoPE order to transformers' halves order:
    within each head, new row j*D/2 + i = old row 2*i + j."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def header_to_config(hdr: Llama2cHeader, name: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=hdr.vocab_size, dim=hdr.dim, n_layers=hdr.n_layers, n_heads=hdr.n_heads,
        n_kv_heads=hdr.n_kv_heads, intermediate_size=hdr.hidden_dim, head_dim=hdr.head_dim,
        norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_seq_len=hdr.seq_len,
        tie_embeddings=hdr.shared_classifier, qkv_bias=False, activation="silu",
        bos_token_id=1, eos_token_ids=[2], arch="llama2c", name=name,
    )


def _arrays(path: Path, hdr: Llama2cHeader) -> dict[str, np.ndarray]:
    """Views of each array in a copy-on-write memory map (nothing is read until used)."""
    mm = np.memmap(path, dtype=np.float32, mode="c", offset=HEADER_BYTES)
    out, pos = {}, 0
    for name, shape in hdr.layout():
        n = int(np.prod(shape))
        out[name] = mm[pos:pos + n].reshape(shape)
        pos += n
    return out


def iter_llama2c_tensors(path: str | os.PathLike, hdr: Llama2cHeader | None = None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical (name, tensor) pairs; wq/wk permuted to the halves layout. Tensors other than
    wq/wk are views of the memory map."""
    path = Path(path)
    hdr = hdr or read_header(path)
    a = _arrays(path, hdr)
    t = torch.from_numpy
    yield "tok_embeddings", t(a["token_embedding"])
    for i in range(hdr.n_layers):
        yield f"layers.{i}.attn_norm", t(a["rms_att"][i])
        yield f"layers.{i}.wq", permute_rope_rows(t(a["wq"][i]), hdr.n_heads)
        yield f"layers.{i}.wk", permute_rope_rows(t(a["wk"][i]), hdr.n_kv_heads)
        yield f"layers.{i}.wv", t(a["wv"][i])
        yield f"layers.{i}.wo", t(a["wo"][i])
        yield f"layers.{i}.ffn_norm", t(a["rms_ffn"][i])
        yield f"layers.{i}.w_gate", t(a["w1"][i])
        yield f"layers.{i}.w_up", t(a["w3"][i])
        yield f"layers.{i}.w_down", t(a["w2"][i])
    yield "norm", t(a["rms_final"])
    if not hdr.shared_classifier:
        yield "lm_head", t(a["wcls"])


class Llama2cSource(ModelSource):
    def __init__(self, path: Path, tokenizer_path: Path | None = None, name: str | None = None):
        hdr = read_header(path)
        super().__init__(path, header_to_config(hdr, name or Path(path).stem))
        self.header = hdr
        if tokenizer_path is None:
            from sparsedge.tokenizer import find_llama2c_tokenizer
            tokenizer_path = find_llama2c_tokenizer(path, hdr.vocab_size)
            if tokenizer_path is None:
                raise FileNotFoundError(
                    f"no llama2.c tokenizer (tok*.bin) found beside {path}; put it in the same folder "
                    "or pass tokenizer=PATH (e.g. open_model(model, tokenizer='tok512.bin'))")
        self.tokenizer_path = Path(tokenizer_path)
        if not self.tokenizer_path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {self.tokenizer_path}")
        _ = self.tokenizer  # cheap; a vocabulary mismatch shows up now rather than later
        logger.debug("llama2.c checkpoint {}: {}", path, hdr)

    def _load_tokenizer(self) -> Tokenizer:
        from sparsedge.tokenizer import load_tokenizer
        return load_tokenizer(self.tokenizer_path, vocab_size=self.header.vocab_size, name=self.config.name)

    def _raw_tensors(self):
        return iter_llama2c_tensors(self.path, self.header)

    def describe(self) -> str:
        return f"llama2c:{self.path}"


# canonical -> transformers Llama parameter names (the inverse of the HF loader's map)
_CANONICAL_TO_HF_LAYER = {ours: hf for hf, ours in _HF_LAYER_MAP.items()}


def canonical_to_hf_name(name: str) -> str:
    if name == "tok_embeddings":
        return "model.embed_tokens.weight"
    if name == "norm":
        return "model.norm.weight"
    if name == "lm_head":
        return "lm_head.weight"
    _, i, k = name.split(".", 2)
    sub = _CANONICAL_TO_HF_LAYER[k]
    return f"model.layers.{i}.{sub}"


def llama2c_to_hf(bin_path: str | os.PathLike, out_dir: str | os.PathLike,
                  tokenizer_path: str | os.PathLike | None = None) -> Path:
    """Write a transformers LlamaForCausalLM checkpoint folder (config.json, generation_config.json,
    model.safetensors) for a llama2.c checkpoint, with wq/wk permuted to the halves RoPE layout.
    The llama2.c tokenizer (found beside the .bin, or `tokenizer_path`) is copied in when there is
    one, so that `open_model(out_dir)` finds it."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    bin_path, out = Path(bin_path), Path(out_dir)
    hdr = read_header(bin_path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        vocab_size=hdr.vocab_size, hidden_size=hdr.dim, intermediate_size=hdr.hidden_dim,
        num_hidden_layers=hdr.n_layers, num_attention_heads=hdr.n_heads, num_key_value_heads=hdr.n_kv_heads,
        head_dim=hdr.head_dim, hidden_act="silu", max_position_embeddings=hdr.seq_len, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=hdr.shared_classifier, bos_token_id=1, eos_token_id=2,
        attention_bias=False, mlp_bias=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    sd = {canonical_to_hf_name(n): t.contiguous().clone() for n, t in iter_llama2c_tensors(bin_path, hdr)}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok = Path(tokenizer_path) if tokenizer_path else None
    if tok is None:
        from sparsedge.tokenizer import find_llama2c_tokenizer
        try:
            tok = find_llama2c_tokenizer(bin_path, hdr.vocab_size)
        except ValueError:
            tok = None
    if tok is not None:
        shutil.copyfile(tok, out / tok.name)
    logger.info("wrote transformers checkpoint for {} to {}", bin_path, out)
    return out


__all__ = ["Llama2cHeader", "Llama2cSource", "read_header", "permute_rope_rows", "iter_llama2c_tensors",
           "llama2c_to_hf", "header_to_config", "canonical_to_hf_name"]
