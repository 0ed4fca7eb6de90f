"""Build the decoder from a ModelSource's tensor stream, one layer at a time.

The source yields tensors lazily (memmap / safetensors views); each layer's pieces are converted into
the kernels' layout (fused qkv, fused gate/up, transposed down) as soon as the layer is complete and
the source's views are dropped, so at no point do two full copies of the weights exist.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from loguru import logger
from tqdm import tqdm

from sparsedge.loading.base import extra_layer_keys
from sparsedge.model import Attention, Block, DenseFFN, ExtendedAttention, SubNormFFN, Transformer
from sparsedge.quant import formats as qf
from sparsedge.quant.qweight import QWeight
from sparsedge.quant.ternary import TernaryWeight

_LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "tok_embeddings", "lm_head")


class _Converter:
    """Each tensor into the form the decoder keeps: `mode` "native" keeps quantized tensors in their own
    blocks (QWeight) and floats in `dtype`; None dequantizes everything to `dtype`; a quantized qtype
    ("q8_0", "q4_0", "q4_1") quantizes every projection matrix on load (rows whose length is not a multiple of
    the block stay in `dtype`, with a warning). BitNet's ternary projections (TernaryWeight) stay ternary in either
    of the first two modes and are refused by the others."""

    def __init__(self, backend, dtype: torch.dtype, mode: str | None):
        self.backend, self.dtype, self.mode = backend, dtype, mode
        self.kept_float: list[str] = []

    def __call__(self, t, key: str):
        if isinstance(t, TernaryWeight):
            if self.mode not in (None, "native"):
                raise ValueError(f"weights={self.mode!r}: {key} is a BitNet b1.58 ternary projection, which runs as "
                                 f"BitLinear (int8 activations per token); requantizing it to {self.mode} would change "
                                 "the model's arithmetic. Load it without weights=")
            return t.to(self.backend.device)
        if isinstance(t, QWeight):
            if self.mode == "native":
                return t.to(self.backend.device)
            t = t.dequantize()
        if self.mode not in (None, "native") and key in MATRICES:
            if t.shape[-1] % qf.get_format(self.mode).block == 0:
                return QWeight.quantize(t, self.mode).to(self.backend.device)
            self.kept_float.append(key)
        return self.backend.place(t, self.dtype)

    def transposed(self, t, key: str):
        """W_down: a QWeight / TernaryWeight stays [d, I] (qlinear / bitlinear); a float weight is stored transposed
        [I, d]."""
        out = self(t, key)
        return out.t().contiguous() if isinstance(out, torch.Tensor) else out


def _fuse(parts: list):
    """Row concatenation of one projection's pieces: a tensor, one QWeight or TernaryWeight, or a tuple of mixed
    formats."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, 0)
    return QWeight.cat(parts) or TernaryWeight.cat(parts) or tuple(parts)


# --- the pieces beyond Llama (sparsedge.config); a Llama-family config gets the plain modules -----------------
def _attention(cfg, wqkv, bqkv, wo, p: dict, conv):
    if not (cfg.qk_norm or cfg.sub_norms):
        return Attention(cfg, wqkv, bqkv, wo)
    qn, kn, sub = (conv(p[k], k) if k in p else None for k in ("q_norm", "k_norm", "attn_sub_norm"))
    return ExtendedAttention(cfg, wqkv, bqkv, wo, q_norm=qn, k_norm=kn, sub_norm=sub)


def _ffn_class(cfg, p: dict, conv):
    if not cfg.sub_norms:
        return DenseFFN
    sub = conv(p["ffn_sub_norm"], "ffn_sub_norm")
    return lambda *args, **kw: SubNormFFN(*args, sub_norm=sub, eps=cfg.norm_eps, **kw)


def _block_extras(cfg, block: Block, i: int, p: dict, conv) -> None:
    if cfg.post_norms:
        block.post_attn_norm = conv(p["post_attn_norm"], "post_attn_norm")
        block.post_ffn_norm = conv(p["post_ffn_norm"], "post_ffn_norm")
    block.local_rope = bool(cfg.rope_local_theta) and i in cfg.sliding_layers


def build_transformer(source, backend, dtype: torch.dtype, progress: bool = True, mode: str | None = None
                      ) -> Transformer:
    cfg = source.config
    conv = _Converter(backend, dtype, mode)
    pending: dict[int, dict] = defaultdict(dict)
    blocks: dict[int, Block] = {}
    top: dict = {}
    need = set(_LAYER_KEYS) | ({"bq", "bk", "bv"} if cfg.qkv_bias else set()) | set(extra_layer_keys(cfg))
    t0 = time.perf_counter()
    n_expected = cfg.n_layers * len(need) + 2 + (0 if cfg.tie_embeddings else 1)
    bar = None
    for name, tensor in source.tensors():
        if bar is None:  # started at the first tensor: a source may convert everything before yielding
            bar = tqdm(total=n_expected, desc=f"loading {cfg.name}", unit="tensor", leave=False,
                       disable=not progress, mininterval=1.0, delay=2.0)  # appears only when slow
        bar.update(1)
        if not name.startswith("layers."):
            top[name] = conv(tensor, name)
            continue
        _, idx, key = name.split(".", 2)
        i = int(idx)
        pending[i][key] = tensor
        if need <= pending[i].keys():
            p = pending.pop(i)
            wqkv = _fuse([conv(p[k], k) for k in ("wq", "wk", "wv")])
            bqkv = conv(torch.cat([p["bq"], p["bk"], p["bv"]], 0), "bqkv") if cfg.qkv_bias else None
            attn = _attention(cfg, wqkv, bqkv, conv(p["wo"], "wo"), p, conv)
            ffn_cls = _ffn_class(cfg, p, conv)
            down = conv.transposed(p["w_down"], "w_down")
            gate_up = _fuse([conv(p["w_gate"], "w_gate"), conv(p["w_up"], "w_up")])
            ffn = (ffn_cls(cfg, gate_up, down) if isinstance(down, torch.Tensor)
                   else ffn_cls(cfg, gate_up, None, w_down=down))
            blocks[i] = Block(conv(p["attn_norm"], "attn_norm"), attn, conv(p["ffn_norm"], "ffn_norm"), ffn)
            _block_extras(cfg, blocks[i], i, p, conv)
            del p
    if bar is not None:
        bar.close()
    if conv.kept_float:
        logger.warning(f"{source.describe()}: {len(conv.kept_float)} weights have rows that are not a multiple of "
                       f"the {mode} block and stay {dtype} ({sorted(set(conv.kept_float))})")
    missing = [i for i in range(cfg.n_layers) if i not in blocks]
    if missing or "tok_embeddings" not in top or "norm" not in top:
        raise ValueError(f"{source.describe()}: incomplete checkpoint (layers missing: {missing[:8]}, "
                         f"top-level tensors present: {sorted(top)}); the file may be truncated or not a "
                         f"{cfg.arch} checkpoint")
    lm_head = top["tok_embeddings"] if cfg.tie_embeddings else top.get("lm_head")
    if lm_head is None:
        raise ValueError(f"{source.describe()}: no lm_head tensor and embeddings are not tied")
    model = Transformer(cfg, top["tok_embeddings"], [blocks[i] for i in range(cfg.n_layers)], top["norm"], lm_head)
    logger.info(f"built {cfg.name}: {cfg.n_layers} layers, weights {mode or dtype}, on {backend.device} "
                f"in {time.perf_counter() - t0:.1f}s")
    return model
