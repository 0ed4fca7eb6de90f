"""One decode step with the layer loop in C++ (backends/cpu/decode_loop.cpp), for the models where it applies.

sparsedge.generate.decode_one_token asks `plan_for(model, cache)`; when it returns a plan, the step is the
embedding and first norm here, the layers in C++ (the same sparsedge ops in the same order as
sparsedge.model.Transformer's forward, so the logits are bit-identical), then the LM head here.

The plan covers, on CPU:
- the plain and the general decoder path (scaled embeddings, q/k norms, sub-norm, post-norms, the sliding layers'
  RoPE tables, logit softcapping: Gemma 3, Qwen3);
- attention with one weight per projection (a float tensor or one QWeight);
- any cache: the dense one in C++; the delta cache's decode step as one `delta_step` op in C++ (its host
  counters are a tensor the loop advances; it calls the cache's `attend` back when the buffer must grow or the
  step is not a plain decode step); windowed caches through their own `attend`, called back from the loop;
- FFNs that are a `DenseFFN` (one gate/up weight; SiLU, or GELU in fp32), a `DownSkipFFN` on block weights, or a
  predictor FFN (`SparseFFN` on float or block weights, `Q4SparseFFN` on float weights), whose decode step is the
  same op calls as its `sparse` (predictor, then the listed rows).
Anything else (a runtime CATS tau on a dense FFN, BitNet's FFN sub-norm, CUDA/NPU) returns None and runs the Python
path. Plans are
cached on the cache object and rebuilt when the model's FFN modules or the cache's layers change.

Statistics: the C++ loop skips the modules' Python counters, so `run` adds them afterwards (a DownSkipFFN's
kept-row counter is a tensor the loop updates itself).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from sparsedge.kv_cache import DenseLayerCache
from sparsedge.quant.qweight import QWeight

ops = torch.ops.sparsedge
_MODULE = None
_NONE = torch.empty(0)
# False: always the Python path (benchmarks compare the two; SPARSEDGE_FUSED_STEP=0 sets it at import)
enabled = os.environ.get("SPARSEDGE_FUSED_STEP", "1") != "0"


def _kernels():
    global _MODULE
    if _MODULE is None:
        try:
            from sparsedge.backends import _cpu_kernels
            _MODULE = _cpu_kernels if hasattr(_cpu_kernels, "DecodePlan") else False
        except ImportError:
            _MODULE = False
    return _MODULE


def _proj(w):
    """(tensor, qtype, K) of a projection the C++ loop can run, else None."""
    if isinstance(w, QWeight):
        return w.data, w.qtype, w.K
    if isinstance(w, torch.Tensor):
        return w, "", 0
    return None


def _key(model, cache) -> tuple:
    # _modules lookups: nn.Module attribute access costs ~0.5 us each, and this runs every token
    return (id(model), *(id(layer._modules["ffn"]) for layer in model.layers), *(id(lc) for lc in cache.layers))


def _counters(model, cache) -> tuple:
    """What run() updates after the C++ loop, gathered once per plan: the counter lists the Python path keeps
    (in place: reset_stats zeroes them in place) and the dense caches whose length it sets."""
    from sparsedge.model import DenseFFN
    att = [layer.attention._n for layer in model.layers]
    ffn = [layer.ffn._n for layer in model.layers if type(layer.ffn) is DenseFFN]
    return att, ffn, [lc for lc in cache.layers if type(lc) is DenseLayerCache]


def _build(model, cache):
    from sparsedge.delta.cache import DeltaLayerCache
    from sparsedge.ffn.downskip import DownSkipFFN
    from sparsedge.ffn.module import Q4SparseFFN, SparseFFN
    from sparsedge.model import Attention, DenseFFN, ExtendedAttention

    mod = _kernels()
    cfg = model.config
    if not mod or model.device.type != "cpu":
        return None
    plan = mod.DecodePlan(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, float(cfg.norm_eps))
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        att, ffn, lc = layer.attention, layer.ffn, cache.layers[i]
        if type(att) not in (Attention, ExtendedAttention) or not hasattr(lc, "attend"):
            return None
        dense_cache = type(lc) is DenseLayerCache  # else its attend() is called back (the delta step: see below)
        qkv, o = _proj(att.wqkv), _proj(att.wo)
        if qkv is None or o is None or (att.bqkv is not None and att.bqkv.dtype != model.dtype):
            return None
        next_norm = model.layers[i + 1].attn_norm if i + 1 < n else model.norm
        plan.add_attention(*qkv, att.bqkv, *o, *((lc.k, lc.v) if dense_cache else (_NONE, _NONE)),
                           float(getattr(lc, "scale", 1.0)), layer.ffn_norm, next_norm, None if dense_cache else lc.attend)
        if type(lc) is DeltaLayerCache:  # its decode step in C++ (attend where it must grow)
            plan.set_delta(lc.ref, lc.theta, lc.values, lc.chan, lc.offsets, lc.sink_k, lc.window_k, lc.v_cache,
                           lc.state, lc.n_sink, lc.window, lc.scale)
        plan.set_extras(getattr(att, "q_norm", None), getattr(att, "k_norm", None), getattr(att, "sub_norm", None),
                        layer.post_attn_norm, layer.post_ffn_norm, bool(layer.local_rope and model.rope_local))
        if type(ffn) is DenseFFN:
            gu = _proj(ffn.w_gate_up)
            down = _proj(ffn.w_down) if ffn.quantized else (ffn.w_down_t, "", 0)
            smooth_fp32 = ffn.activation in ("gelu", "gelu_tanh") and model.dtype == torch.float32
            if gu is None or down is None or ffn.tau != 0.0 or not (ffn.activation == "silu" or smooth_fp32):
                return None
            plan.set_dense_ffn(*gu, *down, not ffn.quantized, ffn.I, ffn.activation)
        elif type(ffn) is DownSkipFFN and ffn.down_t is not None:
            w = ffn.dense.w_gate_up
            plan.set_skip_ffn(w.data, w.qtype, *ffn.down_t.tensors(), ffn.thresh, ffn.dense.activation,
                              float(ffn.dense.act_param), ffn._acc)
        elif type(ffn) in (SparseFFN, Q4SparseFFN):
            if not _predictor_ffn(plan, ffn):
                return None
        else:
            return None
    return plan


def _predictor_ffn(plan, ffn) -> bool:
    """Hand a predictor FFN's decode step (what its `sparse` runs) to the plan; False where the plan cannot."""
    from sparsedge.ffn.module import Q4SparseFFN

    d, act, param = ffn.dense, ffn.activation, float(ffn.act_param)
    if type(ffn) is Q4SparseFFN:
        if d.quantized:
            return False
        plan.set_predictor_ffn("q4", ffn.q, ffn.scale, ffn.thresh, d.w_gate, d.w_up, d.w_down_t, None, "", act, param,
                               0.0, ffn._acc)
    elif ffn.down_t is not None:
        w = d.w_gate_up
        plan.set_predictor_ffn("svd_q", ffn.p1, ffn.p2, ffn.bias, w.data, *ffn.down_t.tensors(), w.qtype, act, param,
                               0.0, ffn._acc)
    elif not d.quantized:
        plan.set_predictor_ffn("svd", ffn.p1, ffn.p2, ffn.bias, d.w_gate, d.w_up, d.w_down_t, None, "", act, param,
                               ffn.tau, ffn._acc)
    else:
        return False
    return True


def plan_for(model, cache):
    """The C++ layer loop for (model, cache), or None where the Python path must run."""
    if not enabled:
        return None
    key = _key(model, cache)
    cached = getattr(cache, "_fused_plan", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _build(model, cache)
    cache._fused_plan = (key, plan, _counters(model, cache) if plan is not None else None)
    return plan


def run(model, plan, token: torch.Tensor, pos: int, cache) -> torch.Tensor:
    """logits [1, V] of the next token; what Transformer.forward(token, pos, cache) computes."""
    from sparsedge.model import linear

    cfg = model.config
    emb = model.tok_embeddings
    if isinstance(emb, QWeight):  # q8_0 / q4_0 rows in C++ (same values), others through the torch ops
        residual = _kernels().embed_row(emb.data, emb.qtype, emb.K, int(token))
        if residual is None:
            residual = emb.rows(token).dequantize()
    else:
        residual = F.embedding(token, emb)
    if cfg.embed_scale:
        residual = residual * model._embedding_scale(residual.dtype)
    h = ops.rms_norm(residual, model.layers[0].attn_norm, cfg.norm_eps)
    local = model.rope_local or (None, None)
    h = plan.run(h, residual, model.rope_cos, model.rope_sin, local[0], local[1], pos)
    # the counters the Python path keeps
    model._n[0] += 1
    model._n[1] += 1
    att, ffn, dense = cache._fused_plan[2]
    for n in att:
        n[0] += 1
    for n in ffn:
        n[0] += 1
        n[1] += 1
    for lc in dense:  # the other caches keep their own length in attend()
        lc.length = pos + 1
    logits = linear(h, model.lm_head)
    if cfg.final_logit_softcap:
        c = cfg.final_logit_softcap
        logits = torch.tanh(logits / c) * c
    return logits
