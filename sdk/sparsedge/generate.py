"""The decode loop's building blocks, gpt-fast style: one place where tokens go through the decoder.

    cache = new_cache(model, max_seq_len, delta=None)      # dense KV cache, or delta buffers
    logits = prefill(model, ids, cache)                     # positions 0..len(ids)-1 (or from `start`)
    logits = decode_one_token(model, token, pos, cache)     # one position; logits [1, V]
    tokens, logits = greedy(model, ids, n, cache)           # prefill + n greedy steps (tests, benchmarks)

Session.generate (sampling, stop strings, streaming), evaluation (perplexity), the benchmarks and the tests
all run through these, so what is measured is what users run.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sparsedge import fused_step
from sparsedge.kv_cache import KVCache


def new_cache(model, max_seq_len: int, delta=None) -> KVCache:
    """A preallocated cache for `model`: dense K/V, or delta buffers for a sparsedge.delta.DeltaConfig."""
    model.ensure_rope(max_seq_len)
    if delta is not None:
        return delta.make_cache(model.config, max_seq_len, model.dtype, model.device)
    return KVCache.dense(model.config, max_seq_len, model.dtype, model.device)


def _tokens(ids, device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.long).reshape(-1)
    return torch.tensor(list(ids), dtype=torch.long, device=device)


def prefill(model, ids: Sequence[int] | torch.Tensor, cache, start: int = 0, all_logits: bool = False,
            hidden_hook=None) -> torch.Tensor:
    """Run `ids` at positions start..start+len-1 through the model, filling `cache`. Logits [1, V] of the last
    position, or [T, V] of every position with all_logits=True; `hidden_hook(layer, h)` sees each FFN input
    (calibration uses it)."""
    return model(_tokens(ids, model.device), start, cache, all_logits=all_logits, hidden_hook=hidden_hook)


def decode_one_token(model, token: int | torch.Tensor, pos: int, cache) -> torch.Tensor:
    """One decode step: `token` at position `pos` -> logits [1, V] of the next token. Where it applies (CPU, the
    modules sparsedge.fused_step lists), the layer loop runs in C++ (bit-identical logits)."""
    t = token.reshape(1) if isinstance(token, torch.Tensor) else torch.tensor([int(token)], device=model.device)
    plan = fused_step.plan_for(model, cache)
    if plan is not None:
        return fused_step.run(model, plan, t, pos, cache)
    return model(t, pos, cache)


def greedy(model, ids: Sequence[int], n: int, cache=None, max_seq_len: int | None = None
           ) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding from the bare decoder: prefill `ids`, then `n` one-token steps. Returns the new token
    ids and the logits of the last step. A cache is made (dense) when none is given."""
    if cache is None:
        cache = new_cache(model, max_seq_len or len(ids) + n + 1)
    out: list[int] = []
    with torch.inference_mode():
        logits = prefill(model, ids, cache)
        pos = len(ids)
        for _ in range(n):
            t = int(logits[-1].argmax())
            out.append(t)
            logits = decode_one_token(model, t, pos, cache)
            pos += 1
    return out, logits
