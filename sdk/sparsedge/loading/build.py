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

from sparsedge.model import Attention, Block, DenseFFN, Transformer

_LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


def build_transformer(source, backend, dtype: torch.dtype, progress: bool = True) -> Transformer:
    cfg = source.config
    place = lambda t: backend.place(t, dtype)  # noqa: E731
    pending: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    blocks: dict[int, Block] = {}
    top: dict[str, torch.Tensor] = {}
    need = set(_LAYER_KEYS) | ({"bq", "bk", "bv"} if cfg.qkv_bias else set())
    t0 = time.perf_counter()
    n_expected = cfg.n_layers * len(need) + 2 + (0 if cfg.tie_embeddings else 1)
    bar = None
    for name, tensor in source.tensors():
        if bar is None:  # started at the first tensor: a source may convert everything before yielding
            bar = tqdm(total=n_expected, desc=f"loading {cfg.name}", unit="tensor", leave=False,
                       disable=not progress, mininterval=1.0, delay=2.0)  # appears only when slow
        bar.update(1)
        if not name.startswith("layers."):
            top[name] = place(tensor)
            continue
        _, idx, key = name.split(".", 2)
        i = int(idx)
        pending[i][key] = tensor
        if need <= pending[i].keys():
            p = pending.pop(i)
            wqkv = place(torch.cat([p["wq"], p["wk"], p["wv"]], 0))
            bqkv = place(torch.cat([p["bq"], p["bk"], p["bv"]], 0)) if cfg.qkv_bias else None
            attn = Attention(cfg, wqkv, bqkv, place(p["wo"]))
            ffn = DenseFFN(cfg, place(torch.cat([p["w_gate"], p["w_up"]], 0)), place(p["w_down"].t()))
            blocks[i] = Block(place(p["attn_norm"]), attn, place(p["ffn_norm"]), ffn)
            del p
    if bar is not None:
        bar.close()
    missing = [i for i in range(cfg.n_layers) if i not in blocks]
    if missing or "tok_embeddings" not in top or "norm" not in top:
        raise ValueError(f"{source.describe()}: incomplete checkpoint (layers missing: {missing[:8]}, "
                         f"top-level tensors present: {sorted(top)}); the file may be truncated or not a "
                         f"{cfg.arch} checkpoint")
    lm_head = top["tok_embeddings"] if cfg.tie_embeddings else top.get("lm_head")
    if lm_head is None:
        raise ValueError(f"{source.describe()}: no lm_head tensor and embeddings are not tied")
    model = Transformer(cfg, top["tok_embeddings"], [blocks[i] for i in range(cfg.n_layers)], top["norm"], lm_head)
    logger.info(f"built {cfg.name}: {cfg.n_layers} layers, dtype {dtype}, on {backend.device} "
                f"in {time.perf_counter() - t0:.1f}s")
    return model
