"""GGUF files, read natively (sparsedge.loading.gguf_file): config from the metadata, the tokenizer built
from the vocabulary in the file, weights as zero-copy views of the mapped file.

Quantized tensors come out as QWeight (their own blocks, never dequantized here); F32/F16/BF16 ones as float
views. llama.cpp stores W_q and W_k of `llama` files with the rows of each head interleaved for its adjacent-pair
RoPE; they are put back in transformers' rotate-half order by a row permutation, which is exact on quantized rows
(every block format quantizes rows independently). Its other architectures (qwen2, qwen3, gemma3) keep
transformers' order (NEOX RoPE), as transformers' own GGUF loader assumes. Gemma 3 files store each RMSNorm
weight as 1 + w already, the decoder's convention; what llama.cpp hard-codes for Gemma 3 rather than writing it
(the sliding-window pattern 6, the sliding layers' RoPE base 10000, the attention scale) is filled in as llama.cpp
and transformers do. Tensors in a format qlinear does not run (sparsedge.quant.load_only) come out as the same values
in one it runs (q5_0 as q8_0 blocks, tq1_0 as tq2_0 blocks) or dequantized to fp32 (q5_1).

Phi-3 (llama.cpp's Phi3MiniModel): blk.N.attn_qkv holds [q; k; v] and blk.N.ffn_up [gate; up] (llama.cpp's swiglu
takes the first half as the gate, as transformers' Phi3MLP does); both are split into row blocks on load, exact in
every format. phi3.rope.dimension_count gives partial rotary (the q/k rows
of each head reordered as for transformers folders); phi3.attention.sliding_window (0: none) applies to every layer,
as transformers applies it (llama.cpp currently disables Phi-3's window). LongRoPE files (rope_factors_long / _short,
rope.scaling.attn_factor) are refused, as the transformers path refuses 'longrope'.
BitNet b1.58 (llama.cpp's "bitnet"): projections in TQ2_0 / TQ1_0 blocks (the converter folds each projection's
weight scale into its ternary values, so a block's d holds it) or any other format, attn_sub_norm / ffn_sub_norm,
RoPE "linear" with factor 1 (no scaling). The FFN activation is bitnet.hidden_activation when the file has it (relu2
or silu), else relu^2, transformers' BitNet b1.58 (llama.cpp's graph hard-codes SiLU, right for 1bitLLM's
bitnet_b1_58 and wrong for microsoft/bitnet-b1.58-2B-4T). Per-tensor output scale tensors (blk.N.*.scale) are refused.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator

import torch
from loguru import logger

from sparsedge.loading.base import ModelFormatError, ModelSource, canonical_order
from sparsedge.loading.gguf_file import GGUFError, GGUFFile
from sparsedge.loading.hf import _FUSED, _fused_rows, hf_config_to_model_config, merge_ids, partial_rotary_order
from sparsedge.quant import load_only
from sparsedge.quant.qweight import QWeight
from sparsedge.tokenizer import Tokenizer

# GGUF architectures this loader maps, and the transformers model_type each corresponds to
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3",
                 "bitnet": "bitnet"}
_PERMUTED_QK = ("llama",)  # architectures whose converter interleaves the q/k rows (LlamaModel.permute)

_TOP = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm", "output.weight": "lm_head"}
_LAYER = {"attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
          "attn_output.weight": "wo", "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
          "ffn_norm.weight": "ffn_norm", "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up",
          "ffn_down.weight": "w_down",
          "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",  # qwen3, gemma3
          "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_ffn_norm",  # gemma3
          "attn_qkv.weight": "wqkv",  # phi3: [q; k; v] fused (its ffn_up is [gate; up] fused), split on load
          "attn_sub_norm.weight": "attn_sub_norm", "ffn_sub_norm.weight": "ffn_sub_norm"}  # bitnet


def unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row index map from llama.cpp's interleaved q/k rows to rotate-half rows: hf = gguf[index]."""
    D = n_rows // n_heads
    h = torch.arange(n_heads)[:, None, None]
    j = torch.arange(2)[None, :, None]
    c = torch.arange(D // 2)[None, None, :]
    return (h * D + 2 * c + j).reshape(-1)


class GGUFSource(ModelSource):
    def __init__(self, path: Path, tokenizer: Path | None = None, name: str | None = None):
        path = Path(path)
        t0 = time.perf_counter()
        self.file = GGUFFile(path)  # validates the whole directory: truncation, types
        meta = self.file.metadata
        arch = meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelFormatError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                                   f"{', '.join(ARCHITECTURES)})")
        scales = [n for n in self.file.tensors if n.endswith(".scale")]
        if scales:  # llama.cpp multiplies a projection's output by such a tensor (its wo_s, ffn_down_s, ...)
            raise ModelFormatError(f"{path}: per-tensor output scales ({scales[0]!r}, {len(scales)} in all) are not "
                                   f"implemented; a file whose scales are folded into its weights loads")
        cfg = self._rotary(hf_config_to_model_config(self._hf_config(arch), name=name or path.stem), arch)
        super().__init__(path, cfg)
        self.tokenizer_path = tokenizer
        # anything but fp32 matrices runs in its stored format by default (f16/bf16 too: half the bytes of fp32)
        self.quantized = any(i.qtype != "f32" and len(i.shape) == 2 for i in self.file.tensors.values())
        logger.debug("GGUF {} parsed in {:.2f} s", path, time.perf_counter() - t0)

    def _rotary(self, cfg, arch: str):
        """Phi-3's partial rotary from phi3.rope.dimension_count (the rotated channels per head: NEOX RoPE on the
        first R, transformers' partial rotary), set exactly (R / D * D is not always R in floating point)."""
        rot = self.file.metadata.get(f"{arch}.rope.dimension_count")
        if arch != "phi3" or rot is None or int(rot) == cfg.head_dim:
            return cfg
        R = int(rot)
        if R <= 0 or R % 2 or R > cfg.head_dim:
            raise ModelFormatError(f"{self.file.path}: {arch}.rope.dimension_count={R} is not an even count within "
                                   f"head_dim {cfg.head_dim}")
        return cfg.replace(rotary_dim=R)

    def _hf_config(self, arch: str) -> dict:
        """The metadata as the transformers config keys hf_config_to_model_config reads."""
        m, a = self.file.metadata, arch

        def get(key, default=None):
            return m.get(f"{a}.{key}", default)

        tensors = self.file.tensors
        for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
            if get(key) is None:
                raise ModelFormatError(f"{self.file.path}: GGUF metadata lacks {a}.{key}; the file is incomplete")
        long_rope = sorted(n for n in tensors if n.startswith("rope_factors_"))
        if long_rope or get("rope.scaling.attn_factor", 1.0) != 1.0 or get("rope.scaling.type") in ("su", "longrope"):
            what = ", ".join(long_rope) or f"{a}.rope.scaling.attn_factor={get('rope.scaling.attn_factor')}"
            raise ModelFormatError(f"{self.file.path}: RoPE scaling by per-frequency factors (LongRoPE: {what}) is not "
                                   f"supported, as RoPE scaling type 'longrope' of transformers folders is not")
        scaling = get("rope.scaling.type")
        linear = scaling == "linear" and get("rope.scaling.factor") is not None
        if (scaling not in (None, "none") and not linear) or "rope_freqs.weight" in tensors:
            raise ModelFormatError(f"{self.file.path}: RoPE scaling ({get('rope.scaling.type') or 'rope_freqs'}) in "
                                   f"a GGUF file is not supported yet; load the transformers checkpoint instead")
        tokens = m.get("tokenizer.ggml.tokens")
        n_heads = int(get("attention.head_count"))
        d = {
            "model_type": ARCHITECTURES[a],
            "hidden_size": int(get("embedding_length")),
            "num_hidden_layers": int(get("block_count")),
            "intermediate_size": int(get("feed_forward_length")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
            "vocab_size": int(get("vocab_size", len(tokens) if tokens is not None else
                                  tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else 0)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(get("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in tensors,
            "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
            "attention_bias": "blk.0.attn_q.bias" in tensors,
        }
        key_len = get("attention.key_length")
        if key_len is not None and int(key_len) != d["hidden_size"] // n_heads:
            d["head_dim"] = int(key_len)
        if linear and float(get("rope.scaling.factor")) != 1.0:  # bitnet files say linear, factor 1: no scaling
            d["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        if get("attention.sliding_window") is not None:
            d["sliding_window"] = int(get("attention.sliding_window"))
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if get(key) is not None:
                d[key] = float(get(key))
        if a == "gemma3":
            head_dim = int(key_len or d["hidden_size"] // n_heads)
            # llama.cpp: the 62-layer 27B model scales by hidden / heads, the others by the head dim
            d["query_pre_attn_scalar"] = (d["hidden_size"] // n_heads if d["num_hidden_layers"] == 62 else head_dim)
            d["rope_local_base_freq"] = 10000.0
            d["sliding_window_pattern"] = 6
            d["hidden_activation"] = "gelu_pytorch_tanh"
        if a == "bitnet":
            # llama.cpp's converter writes no activation and its graph runs SiLU (1bitLLM's bitnet_b1_58); BitNet
            # b1.58 as transformers defines it (microsoft/bitnet-b1.58-2B-4T) uses relu^2. A file that says
            # {arch}.hidden_activation gets what it says; without it, transformers' relu^2.
            act = get("hidden_activation", "relu2")
            if act not in ("relu2", "silu"):
                raise ModelFormatError(f"{self.file.path}: bitnet.hidden_activation={act!r} is not supported "
                                       f"(relu2, silu)")
            d["hidden_act"] = act
        return d

    # --- tokenizer ------------------------------------------------------------------------------
    def _load_tokenizer(self) -> Tokenizer:
        from sparsedge.tokenizer import HFTokenizer, load_tokenizer

        cfg = self.config
        if self.tokenizer_path is not None:
            tok = load_tokenizer(self.tokenizer_path, name=cfg.name, extra_eos_ids=cfg.eos_token_ids)
        else:
            tok = HFTokenizer(self._hf_tokenizer(), name=cfg.name, extra_eos_ids=cfg.eos_token_ids)
        cfg.eos_token_ids = merge_ids(cfg.eos_token_ids, tok.eos_token_ids)
        return tok

    def _hf_tokenizer(self):
        """The transformers tokenizer the file describes, built the way transformers builds it from a GGUF
        (its converter), from the vocabulary we already parsed (transformers' own GGUF parse takes seconds)."""
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import gguf_tokenizer_mapping as gm

        m = self.file.metadata
        if "tokenizer.ggml.tokens" not in m:
            raise ModelFormatError(f"{self.file.path} carries no tokenizer (tokenizer.ggml.tokens); pass tokenizer=")
        plain = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in m.items()}
        grouped = {group: {name: plain[f"tokenizer.{key}"] for key, name in renames.items()
                           if f"tokenizer.{key}" in plain}
                   for group, renames in gm.GGUF_TOKENIZER_MAPPING.items()}
        tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
        if tokenizer.get("tokenizer_type") == "llama":
            tokenizer_config.setdefault("add_bos_token", True)
        for name, key in gm._SPECIAL_TOKENS.items():
            token_id = plain.get(f"tokenizer.ggml.{key}")
            tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
        backend, extra = gm.convert_gguf_tokenizer(plain["general.architecture"], tokenizer)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)

    # --- weights --------------------------------------------------------------------------------
    def _canonical(self) -> dict[str, str | tuple[str, tuple[int, int]]]:
        """canonical name -> GGUF tensor name, or (name, (first row, end row)) for a row block of a fused tensor."""
        names = {}
        tensors = self.file.tensors
        for gname in tensors:
            if gname in _TOP:
                names[_TOP[gname]] = gname
                continue
            parts = gname.split(".", 2)
            if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER:
                key = _LAYER[parts[2]]
                if key == "w_up" and self.config.arch == "phi3" and f"blk.{parts[1]}.ffn_gate.weight" not in tensors:
                    key = "w_gate_up"  # Phi-3's ffn_up holds [gate; up] (llama.cpp's swiglu takes the first half)
                if key in _FUSED:
                    for part, rows in _fused_rows(self.config, key).items():
                        names[f"layers.{parts[1]}.{part}"] = (gname, rows)
                else:
                    names[f"layers.{parts[1]}.{key}"] = gname
            else:
                raise ModelFormatError(f"{self.file.path}: tensor {gname!r} has no place in a {self.config.arch} "
                                       f"decoder (an option the decoder does not implement)")
        return names

    def _raw_tensors(self) -> Iterator[tuple[str, torch.Tensor | QWeight]]:
        cfg = self.config
        names = self._canonical()
        arch = self.file.metadata.get("general.architecture")
        for c in canonical_order(names):
            gname, rows = names[c] if isinstance(names[c], tuple) else (names[c], None)
            info = self.file.tensors[gname]
            t = self.file.tensor(gname)
            if rows is not None:  # a row block of a fused tensor: rows are independent in every format
                t = t[rows[0]:rows[1]]
                info = dataclasses.replace(info, shape=(rows[1] - rows[0], *info.shape[1:]))
            if info.qtype in load_only.AS_NATIVE and len(info.shape) == 2:  # the same values in a qlinear format
                K = info.shape[-1]
                native, convert = load_only.AS_NATIVE[info.qtype]
                t = QWeight(convert(t.reshape(info.shape[0], -1).view(torch.uint8), K), native, K)
            elif info.qtype in load_only.FORMATS:
                t = load_only.dequantize(t, info.qtype, info.shape[-1]).reshape(info.shape)
            elif info.qtype != "f32" and len(info.shape) == 2:  # f16/bf16 matrices too: qlinear reads them as stored
                t = QWeight(t.reshape(info.shape[0], -1).view(torch.uint8), info.qtype, info.shape[-1])
            key = c.rsplit(".", 1)[-1]
            if key in ("wq", "wk", "bq", "bk") and arch in _PERMUTED_QK:
                heads = cfg.n_heads if key in ("wq", "bq") else cfg.n_kv_heads
                idx = unpermute_rows(info.shape[0], heads)
                t = t.rows(idx) if isinstance(t, QWeight) else t[idx]
            if key in ("wq", "wk", "bq", "bk") and cfg.rotary_dim:  # partial rotary: each head's rotated channels
                order = partial_rotary_order(cfg.head_dim, cfg.rotary_dim)  # first in each half (loading.base)
                idx = (torch.arange(info.shape[0]).reshape(-1, cfg.head_dim)[:, order]).reshape(-1)
                t = t.rows(idx) if isinstance(t, QWeight) else t[idx]
            if c == "lm_head" and cfg.tie_embeddings:
                continue
            yield c, t

    def describe(self) -> str:
        return f"gguf:{self.path}"


__all__ = ["GGUFSource", "GGUFError", "unpermute_rows"]
