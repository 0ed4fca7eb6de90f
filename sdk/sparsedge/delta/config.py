"""Delta attention configuration (DeltaLLM, docs/methods.md §2): what a session's delta cache is built from.

    DeltaConfig.resolve(0.8, model_config)                                   # one global theta
    DeltaConfig.resolve({"theta": [...per layer...], "window": 64, "sinks": 4}, cfg)
    DeltaConfig.resolve({"theta": [[...per KV head...] per layer]}, cfg)
    DeltaConfig.resolve("art/", cfg)                                         # calibrated artifact folder
    DeltaConfig.resolve({"theta": ..., "key_scale": ks}, cfg)                 # + q/k channel balancing
    cache = delta_cfg.make_cache(cfg, max_seq_len, dtype, device)            # -> KVCache of DeltaLayerCache

Knobs: theta (per layer, or per layer x KV head), window W (the last W positions, incl. the query's own,
are scored exactly), sinks (the first positions, scored exactly), and the packed buffer's capacity policy
(initial_density, growth; see sparsedge.delta.cache), and an optional key scale ([L, H, D] powers of two,
sparsedge.delta.balance) folded into the q/k projections by `apply(model, cfg)` at load: a per-channel theta
for free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsedge.delta.balance import check_key_scale, fold_key_scale
from sparsedge.delta.cache import DeltaLayerCache

SECTION = "delta"
DEFAULT_WINDOW = 64
DEFAULT_SINKS = 4


def apply(model, cfg: "DeltaConfig | None") -> None:
    """Make `model`'s weights match `cfg`: fold its key scale into the q/k rows (or unfold the one folded
    before, for a config without one or None). Session.load calls it; call it again when switching configs."""
    fold_key_scale(model, cfg.key_scale if cfg is not None else None)


def delta_from_cli(value: str | None, window: int | None = None, sinks: int | None = None):
    """A `--delta` command-line value (a theta number, or an artifact folder) as DeltaConfig.resolve input;
    --window / --sinks override the defaults for a number (an artifact carries its own)."""
    if value is None:
        return None
    try:
        spec = {"theta": float(value)}
    except ValueError:
        return value
    spec.update({k: v for k, v in (("window", window), ("sinks", sinks)) if v is not None})
    return spec


@dataclass
class DeltaConfig:
    theta: list  # [L][H] floats (per layer, per KV head)
    window: int = DEFAULT_WINDOW
    sinks: int = DEFAULT_SINKS
    initial_density: float = 0.5  # packed-buffer capacity at allocation, fraction of Tmax * D
    growth: float = 0.25  # growth step, fraction of Tmax * D
    source: str = ""
    meta: dict = field(default_factory=dict)
    key_scale: torch.Tensor | None = None  # [L, H, D] powers of two (sparsedge.delta.balance), or None

    def __post_init__(self):
        if int(self.window) < 0 or int(self.sinks) < 0:
            raise ValueError(f"window and sinks must be >= 0, got window={self.window}, sinks={self.sinks}")
        self.window, self.sinks = int(self.window), int(self.sinks)
        if not 0 < self.initial_density <= 1 or not 0 < self.growth <= 1:
            raise ValueError("initial_density and growth must be in (0, 1]")

    @property
    def n_layers(self) -> int:
        return len(self.theta)

    def describe(self) -> str:
        flat = [t for row in self.theta for t in row]
        rng = f"{min(flat):.3g}" if min(flat) == max(flat) else f"{min(flat):.3g}..{max(flat):.3g}"
        bal = ", balanced keys" if self.key_scale is not None else ""
        return (f"delta(theta={rng}, window={self.window}, sinks={self.sinks}{bal}"
                f"{', ' + self.source if self.source else ''})")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def resolve(cls, delta, model_config, model=None, **overrides) -> "DeltaConfig":
        """Accepts a DeltaConfig, a float theta, a dict {"theta": float | [L] | [L][H], "window", "sinks",
        "initial_density", "growth", "key_scale"}, or an artifact folder (str / Path) holding a "delta" section (this
        needs `model`, the loaded Transformer, whose weights the artifact must match; `model_config` may
        also be the model itself)."""
        if hasattr(model_config, "layers") and hasattr(model_config, "config"):
            model, model_config = model_config, model_config.config
        L, H = model_config.n_layers, model_config.n_kv_heads
        if isinstance(delta, DeltaConfig):
            cfg = delta
        elif isinstance(delta, bool):
            raise TypeError("delta must be a theta, a dict, an artifact folder or a DeltaConfig, not a bool")
        elif isinstance(delta, (int, float)):
            cfg = cls(theta=_expand_theta(float(delta), L, H))
        elif isinstance(delta, dict):
            unknown = set(delta) - {"theta", "window", "sinks", "initial_density", "growth", "key_scale"}
            if unknown:
                raise ValueError(f"unknown delta config keys {sorted(unknown)}")
            if "theta" not in delta:
                raise ValueError("delta config dict needs a 'theta'")
            kw = {k: delta[k] for k in ("window", "sinks", "initial_density", "growth", "key_scale") if k in delta}
            cfg = cls(theta=_expand_theta(delta["theta"], L, H), **kw)
        elif isinstance(delta, (str, os.PathLike)):
            text = str(delta)
            try:  # "0.8" from a command line
                return cls.resolve(float(text), model_config, model, **overrides)
            except ValueError:
                pass
            cfg = cls.from_artifact(Path(text), model_config, model)
        else:
            raise TypeError(f"cannot make a delta config from {type(delta).__name__}")
        if overrides:
            cfg = DeltaConfig(**{**cfg.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        cfg.theta = _expand_theta(cfg.theta, L, H)
        if cfg.key_scale is not None:
            cfg.key_scale = check_key_scale(cfg.key_scale, L, H, model_config.head_dim)
        return cfg

    @classmethod
    def from_artifact(cls, path: Path, model_config, model=None) -> "DeltaConfig":
        """Read the "delta" section of an artifact folder written by tools/calibrate.py --delta."""
        from sparsedge import artifact  # noqa: PLC0415  (artifact imports nothing from delta)
        if model is None:
            raise ValueError(f"delta={str(path)!r}: an artifact folder can only be checked against the loaded "
                             f"model; call DeltaConfig.resolve(path, model) (Session.load does)")
        got = artifact.load_section(path, model, SECTION)
        if got is None:
            raise artifact.ArtifactError(f"{path}: no '{SECTION}' section (calibrate with tools/calibrate.py --delta)")
        tensors, meta = got
        theta = tensors["theta"].float().tolist() if "theta" in tensors else meta["theta"]
        return cls(theta=_expand_theta(theta, model_config.n_layers, model_config.n_kv_heads),
                   window=int(meta.get("window", DEFAULT_WINDOW)), sinks=int(meta.get("sinks", DEFAULT_SINKS)),
                   source=str(path), meta=meta, key_scale=tensors.get("key_scale"))

    # --- cache --------------------------------------------------------------------------------
    def make_layer_cache(self, model_config, i: int, max_seq_len: int, dtype, device) -> DeltaLayerCache:
        cache = DeltaLayerCache(model_config.n_kv_heads, model_config.head_dim, max_seq_len, dtype, device,
                                self.theta[i], self.window, self.sinks, self.initial_density, self.growth, layer=i)
        cache.scale = model_config.attention_scale  # head_dim ** -0.5 unless the model says otherwise (Gemma)
        return cache

    def make_cache(self, model_config, max_seq_len: int, dtype, device):
        """A KVCache with a DeltaLayerCache on every global layer. Sliding-window layers keep their exact window
        cache (sparsedge.kv_cache.SlidingLayerCache) and their theta is unused: a delta score is the sum of the
        deltas back to the key's reference, so inside a W-position window it would read the chain past the window's
        start, while the dense window reads W keys; and the part a window could encode is small and bounded
        (W minus the exact local window, no sinks). docs/results/gemma3.md measures what this leaves."""
        from sparsedge.kv_cache import KVCache, layer_cache
        glob = set(delta_layers(model_config))
        if not glob:
            raise ValueError(f"delta attention runs on global layers only, and every layer of {model_config.name} "
                             f"attends to its last {model_config.sliding_window} positions; run it with the dense "
                             f"KV cache")
        if len(self.theta) != model_config.n_layers:
            raise ValueError(f"delta config has theta for {len(self.theta)} layers, model has {model_config.n_layers}")
        return KVCache([self.make_layer_cache(model_config, i, max_seq_len, dtype, device) if i in glob
                        else layer_cache(model_config, i, max_seq_len, dtype, device)
                        for i in range(model_config.n_layers)], max_seq_len)


def delta_layers(model_config) -> list[int]:
    """The layers a delta cache runs on: the global ones (sliding-window layers keep their window cache,
    DeltaConfig.make_cache says why)."""
    return [i for i in range(model_config.n_layers) if not model_config.window(i)]


def _expand_theta(theta, L: int, H: int) -> list[list[float]]:
    """float | [L] | [L][H] (lists or tensors) -> [L][H] list of floats, validated."""
    if isinstance(theta, torch.Tensor):
        theta = theta.tolist()
    if isinstance(theta, (int, float)):
        rows = [[float(theta)] * H for _ in range(L)]
    else:
        theta = list(theta)
        if len(theta) != L:
            raise ValueError(f"theta has {len(theta)} entries, the model has {L} layers")
        rows = []
        for i, t in enumerate(theta):
            if isinstance(t, torch.Tensor):
                t = t.tolist()
            if isinstance(t, (int, float)):
                rows.append([float(t)] * H)
            else:
                t = [float(x) for x in t]
                if len(t) == 1:
                    t = t * H
                if len(t) != H:
                    raise ValueError(f"theta of layer {i} has {len(t)} entries, the model has {H} KV heads")
                rows.append(t)
    for i, row in enumerate(rows):
        for x in row:
            if not (x >= 0 and x != float("inf")):
                raise ValueError(f"theta of layer {i} must be finite and >= 0, got {row}")
    return rows
