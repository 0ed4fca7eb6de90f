"""Delta attention (DeltaLLM, docs/methods.md §2).

    config.py   DeltaConfig (thetas, window, sinks, key scale), `apply(model, cfg)`, `delta_from_cli`
    cache.py    DeltaLayerCache: the delta-buffer layer cache the attention calls
    balance.py  q/k channel balancing: check and fold a power-of-two key scale (exact)
Calibration of thetas and key scales is offline: sparsedge.calibrate.delta.
"""
from sparsedge.delta.cache import DeltaLayerCache
from sparsedge.delta.config import DEFAULT_SINKS, DEFAULT_WINDOW, SECTION, DeltaConfig, apply, delta_from_cli

__all__ = ["DEFAULT_SINKS", "DEFAULT_WINDOW", "SECTION", "DeltaConfig", "DeltaLayerCache", "apply", "delta_from_cli"]
