"""One statistics protocol for everything that counts work.

Every object that does work (the decoder's top level, each Attention, each FFN module dense or sparse, each
layer cache) has two methods:

    stats() -> dict[str, int]     counts since the last reset (device counts are folded here, not per step)
    reset_stats() -> None

and knows its own bytes: a module adds the weight bytes it actually read to its `weight_bytes` counter, so
nothing outside it needs to know its layout (dense, sparse rows, quantized blocks). Counters with the same
name are summed. `read(model, cache)` and `reset(model, cache)` are the only places that walk the objects;
`WorkStats` derives what users see (sparsities, bytes per token, K-cache bytes).

Counter names:
  tokens            positions processed (decoder top level: one per position that went through the model)
  weight_bytes      weight bytes read (every module)
  ffn_neurons       FFN neurons over processed positions (tokens x I)
  ffn_predicted     neurons predicted active (dense FFN: all of them)
  ffn_gate_up_rows  gate/up rows read;  ffn_down_rows: W_down rows accumulated
  sparse_ffn_tokens positions that went through a sparse FFN path (present only where a model has one)
  scored_delta_entries, zero_delta_entries, ...: delta caches (sparsedge/delta/cache.py)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


def counters(obj) -> list:
    """The objects under `obj` (a module tree, a cache, or a list of them) that follow the protocol."""
    if obj is None:
        return []
    if isinstance(obj, (list, tuple)):
        return [c for o in obj for c in counters(o)]
    found = []
    modules = obj.modules() if hasattr(obj, "modules") else [obj]
    for m in modules:
        if callable(getattr(m, "stats", None)) and callable(getattr(m, "reset_stats", None)):
            found.append(m)
    layers = getattr(obj, "layers", None)
    if layers is not None and not hasattr(obj, "modules"):  # a KVCache: its per-layer caches
        found += [c for layer in layers for c in counters(layer)]
    return found


def total(obj) -> dict:
    """Sum of every counter under `obj`."""
    out: dict = {}
    for c in counters(obj):
        for k, v in c.stats().items():
            if isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    return out


def reset(*objs) -> None:
    for c in counters(list(objs)):
        c.reset_stats()


@dataclass
class WorkStats:
    tokens: int = 0
    weight_bytes: int = 0
    weight_bytes_per_token: float = 0.0  # exact for decode, where every call is one position
    ffn_predicted_sparsity: float | None = None  # fraction of neurons predicted inactive
    ffn_sparsity: float | None = None  # executed: gate/up rows skipped
    ffn_down_sparsity: float | None = None  # executed: down rows skipped
    ffn_bytes_sparsity: float | None = None  # share of the FFN's gate + up + down rows not read
    ffn_sparsity_per_layer: list | None = None
    attn_sparsity: float | None = None  # zero delta entries / entries of keys scored through deltas
    k_cache_bytes: int = 0
    k_cache_dense_bytes: int = 0
    k_cache_bytes_ratio: float = 1.0
    counters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _ffn_fraction(c: dict, key: str) -> float | None:
    return 1.0 - c[key] / c["ffn_neurons"] if c.get("ffn_neurons") else None


def read(model, cache=None, per_layer: bool = False) -> WorkStats:
    """Every counter of `model` (and `cache`), with the derived figures."""
    c = total([model, cache])
    st = WorkStats(tokens=int(c.get("tokens", 0)), weight_bytes=int(c.get("weight_bytes", 0)), counters=c)
    st.weight_bytes_per_token = st.weight_bytes / st.tokens if st.tokens else 0.0
    if "sparse_ffn_tokens" in c:
        st.ffn_predicted_sparsity = _ffn_fraction(c, "ffn_predicted")
        st.ffn_sparsity = _ffn_fraction(c, "ffn_gate_up_rows")
        st.ffn_down_sparsity = _ffn_fraction(c, "ffn_down_rows")
        if st.ffn_sparsity is not None:
            st.ffn_bytes_sparsity = (2 * st.ffn_sparsity + st.ffn_down_sparsity) / 3
        if per_layer:
            st.ffn_sparsity_per_layer = [_ffn_fraction(total(layer.ffn), "ffn_gate_up_rows") for layer in model.layers]
    if c.get("scored_delta_entries"):
        st.attn_sparsity = c["zero_delta_entries"] / c["scored_delta_entries"]
    if cache is not None:
        st.k_cache_bytes, st.k_cache_dense_bytes = cache.k_bytes(), cache.dense_k_bytes()
        st.k_cache_bytes_ratio = st.k_cache_bytes / st.k_cache_dense_bytes if st.k_cache_dense_bytes else 1.0
    return st
