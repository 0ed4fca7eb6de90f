"""SparseFFN: the predictor-gated FFN that replaces a layer's DenseFFN (METHODS.md section 1).

Decode (T = 1) runs `sparsedge::sparse_ffn`: predictor GEMVs, compaction, gate/up for the predicted
rows, activation (+ tau zeros), down accumulation over the surviving rows, all in one fused call.
Prefill (T > 1) runs per token through the same op when `per_token` is set (evaluation does this so
perplexity measures exactly what decode executes), otherwise the dense matmuls: the union of per-token
active sets covers nearly every neuron after a few tokens, and batched GEMMs beat T sparse GEMVs (see
docs/results/ffn.md for the measurement that chose this default).

Counters are kept as tensors and only summed when `stats()` is read, so the decode path does no
`.item()` per layer per token.
"""
from __future__ import annotations

import torch
from torch import nn

ops = torch.ops.sparsedge


class SparseFFN(nn.Module):
    def __init__(self, dense: nn.Module, p1: torch.Tensor, p2: torch.Tensor, bias: torch.Tensor,
                 tau: float = 0.0, per_token: bool = False, layer_index: int = -1):
        super().__init__()
        I, d = dense.w_down_t.shape
        if p1.dim() != 2 or p1.shape[1] != d or p2.shape != (I, p1.shape[0]) or bias.shape != (I,):
            raise ValueError(f"layer {layer_index}: predictor shapes p1 {tuple(p1.shape)}, p2 {tuple(p2.shape)}, "
                             f"bias {tuple(bias.shape)} do not fit an FFN with d={d}, I={I}")
        self.dense = dense
        self.p1, self.p2, self.bias = p1, p2, bias
        self.tau = float(tau)
        self.per_token = per_token
        self.layer_index = layer_index
        self.I, self.d = I, d
        self.activation, self.act_param = dense.activation, float(dense.act_param)
        self.reset_stats()

    @property
    def rank(self) -> int:
        return self.p1.shape[0]

    def predictor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.p1, self.p2, self.bias))

    def weight_bytes(self) -> int:  # the dense weights (what a dense step reads)
        return self.dense.weight_bytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if T == 1 or self.per_token:
            d = self.dense
            y, count, down_count = ops.sparse_ffn(x, self.p1, self.p2, self.bias, d.w_gate, d.w_up, d.w_down_t,
                                                  self.activation, self.act_param, self.tau)
            self._tokens += T
            self._pending.append((count, down_count))
            if len(self._pending) >= 512:
                self._fold()
            return y
        self._dense_tokens += T
        self._dense_calls += 1
        return self.dense(x)

    # --- statistics ---------------------------------------------------------------------------
    def _fold(self) -> None:
        if self._pending:
            c = torch.cat([p[0] for p in self._pending]).sum(dtype=torch.int64)
            dc = torch.cat([p[1] for p in self._pending]).sum(dtype=torch.int64)
            self._sums = self._sums + torch.stack([c, dc]).cpu()
            self._pending = []

    def reset_stats(self) -> None:
        self._tokens = 0
        self._dense_tokens = 0
        self._dense_calls = 0
        self._pending: list = []
        self._sums = torch.zeros(2, dtype=torch.int64)

    def stats(self) -> dict:
        self._fold()
        active, down = (int(v) for v in self._sums.tolist())
        elt = self.dense.w_down_t.element_size()
        tokens = self._tokens + self._dense_tokens
        dense_rows = self._dense_tokens * self.I
        return {
            "tokens": tokens,
            "neurons": tokens * self.I,
            "predicted_active": active + dense_rows,
            "gate_up_rows": active + dense_rows,
            "down_active": down + dense_rows,
            "weight_bytes": (self._tokens * self.predictor_bytes() + 2 * active * self.d * elt + down * self.d * elt
                             + self._dense_calls * self.dense.weight_bytes()),
        }

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, d={self.d}, I={self.I}, rank={self.rank}, act={self.activation}, "
                f"tau={self.tau:.4g}, per_token={self.per_token}")


def set_per_token(model, on: bool = True) -> None:
    """Run every SparseFFN of `model` per token in prefill too (what evaluation uses)."""
    for layer in model.layers:
        if isinstance(layer.ffn, SparseFFN):
            layer.ffn.per_token = on


def attach_predictors(model, path, backend=None, *, per_token: bool = False) -> dict:
    """Replace each `layer.ffn` of `model` with a SparseFFN built from the artifact at `path`.

    Returns the FFN section's meta. Raises sparsedge.artifact.ArtifactError for a missing, corrupt or
    mismatched artifact, or one without an FFN section."""
    from ..artifact import ArtifactError, load_section
    from ..backends import get_backend

    be = get_backend(backend) if backend is not None else None
    loaded = load_section(path, model, "ffn")
    if loaded is None:
        raise ArtifactError(f"artifact {path} has no 'ffn' section (it holds other calibration only); "
                            f"calibrate FFN predictors into it with tools/calibrate.py --out {path}")
    tensors, meta = loaded
    try:
        attach_tensors(model, tensors, meta.get("tau"), be, per_token=per_token)
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"artifact {path}: {exc}; re-run tools/calibrate.py for this model") from None
    if be is not None:
        be.require("ffn_predict", "sparse_ffn_rows", "sparse_ffn")
    return meta


def attach_tensors(model, tensors: dict, taus=None, backend=None, per_token: bool = False) -> None:
    """Replace each layer's FFN with a SparseFFN from artifact-style tensors (layers.{i}.p1/p2/bias)."""
    taus = taus or [0.0] * model.config.n_layers
    wdtype = model.dtype
    for i, layer in enumerate(model.layers):
        keys = [f"layers.{i}.{k}" for k in ("p1", "p2", "bias")]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise KeyError(f"FFN section lacks {missing}")
        dense = getattr(layer.ffn, "dense", layer.ffn)
        if backend is not None:
            place = backend.place
        else:
            place = lambda t, dt: t.to(device=dense.w_down_t.device, dtype=dt).contiguous()  # noqa: E731
        layer.ffn = SparseFFN(dense, place(tensors[keys[0]], wdtype), place(tensors[keys[1]], wdtype),
                              place(tensors[keys[2]], torch.float32), tau=float(taus[i]), per_token=per_token,
                              layer_index=i)


def detach_predictors(model) -> None:
    """Put every layer's DenseFFN back."""
    for layer in model.layers:
        layer.ffn = getattr(layer.ffn, "dense", layer.ffn)
