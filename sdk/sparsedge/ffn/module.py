"""SparseFFN: the predictor-gated FFN that replaces a layer's DenseFFN (docs/methods.md §1).

Decode (T = 1) runs `sparsedge::sparse_ffn`: predictor GEMVs, compaction, gate/up for the predicted
rows, activation (+ tau zeros), down accumulation over the surviving rows, all in one fused call.
Q4SparseFFN (the 4-bit gate x up predictor of sdk/sparsedge/ffn/q4.py, for SiLU/GELU models) runs
`ffn_predict_q4` and then `sparse_ffn_rows` on its index list.
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

from sparsedge.activations import RELU_FAMILY
from sparsedge.ffn import q4
from sparsedge.quant.ternary import refuse_ternary

ops = torch.ops.sparsedge


class SparseFFN(nn.Module):
    """Whitened-SVD predictor (p1, p2, bias) + the fused sparse_ffn op."""

    def __init__(self, dense: nn.Module, p1: torch.Tensor, p2: torch.Tensor, bias: torch.Tensor,
                 tau: float = 0.0, per_token: bool = False, layer_index: int = -1):
        super().__init__()
        self._setup(dense, tau, per_token, layer_index)
        I, d = self.I, self.d
        if p1.dim() != 2 or p1.shape[1] != d or p2.shape != (I, p1.shape[0]) or bias.shape != (I,):
            raise ValueError(f"layer {layer_index}: predictor shapes p1 {tuple(p1.shape)}, p2 {tuple(p2.shape)}, "
                             f"bias {tuple(bias.shape)} do not fit an FFN with d={d}, I={I}")
        self.p1, self.p2, self.bias = p1, p2, bias
        if dense.quantized:  # W_down by neuron (sparsedge.quant.down_t), run by qsparse_ffn_rows
            from sparsedge.ffn.downskip import down_by_neuron
            if self.activation not in RELU_FAMILY or self.tau != 0.0:
                raise ValueError(f"layer {layer_index}: SVD predictors run on quantized weights for the relu family "
                                 f"(exact zeros) only; this FFN is {self.activation}"
                                 + (f" with tau {self.tau}" if self.tau else ""))
            self.down_t = down_by_neuron(dense, layer_index)

    def _setup(self, dense: nn.Module, tau: float, per_token: bool, layer_index: int) -> None:
        refuse_ternary(dense, layer_index, "the predictor FFN path")
        if getattr(dense, "sub_norm", None) is not None:
            raise ValueError(f"layer {layer_index}: the FFN normalises h before W_down (BitNet's ffn_sub_norm), "
                             "which the sparse FFN path does not implement")
        self.dense = dense
        self.down_t = None  # set by SparseFFN on quantized weights
        self.I, self.d = (dense.w_down.K, dense.w_down.N) if dense.quantized else dense.w_down_t.shape
        self.tau = float(tau)
        self.per_token = per_token
        self.layer_index = layer_index
        self.activation, self.act_param = dense.activation, float(dense.act_param)
        self.reset_stats()

    @property
    def rank(self) -> int:
        return self.p1.shape[0]

    def predictor_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.p1, self.p2, self.bias

    def predictor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.predictor_tensors())

    def weight_bytes(self) -> int:  # the dense weights (what a dense step reads)
        return self.dense.weight_bytes()

    def sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, count, down_count) through the predictor-gated path, one active set per token."""
        d = self.dense
        if self.down_t is not None:
            idx, count = ops.ffn_predict(x, self.p1, self.p2, self.bias)
            w = d.w_gate_up
            y, down_count = ops.qsparse_ffn_rows(x, idx, count, w.data, w.qtype, *self.down_t.tensors(),
                                                 self.activation, self.act_param)
            return y, count, down_count
        return ops.sparse_ffn(x, self.p1, self.p2, self.bias, d.w_gate, d.w_up, d.w_down_t,
                              self.activation, self.act_param, self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if T == 1 or self.per_token:
            y, count, down_count = self.sparse(x)
            self._n[0] += T
            self._pending.append((count, down_count))
            if len(self._pending) >= 512:
                self._fold()
            return y
        return self.dense(x)  # counts its own (dense) work

    # --- statistics ---------------------------------------------------------------------------
    def _fold(self) -> None:
        if self._pending:
            c = torch.cat([p[0] for p in self._pending]).sum(dtype=torch.int64)
            dc = torch.cat([p[1] for p in self._pending]).sum(dtype=torch.int64)
            self._sums = self._sums + torch.stack([c, dc]).cpu()
            self._pending = []

    def reset_stats(self) -> None:
        self._n = [0]  # tokens through the sparse path
        self._pending: list = []
        self._sums = torch.zeros(2, dtype=torch.int64)
        # [tokens, predicted, down rows] of the decode steps the C++ layer loop ran (sparsedge.fused_step); zeroed
        # in place, since the loop holds this tensor
        if getattr(self, "_acc", None) is None:
            self._acc = torch.zeros(3, dtype=torch.int64)
        self._acc.zero_()

    def stats(self) -> dict:
        """The sparse path's work (prefill through the dense path is counted by the DenseFFN inside)."""
        self._fold()
        loop_tokens, loop_active, loop_down = (int(v) for v in self._acc.tolist())
        active, down = (int(v) for v in self._sums.tolist())
        tokens, active, down = self._n[0] + loop_tokens, active + loop_active, down + loop_down
        if self.down_t is not None:  # block rows of gate/up, code rows + block scales of down
            rows = 2 * active * self.dense.w_gate_up.data.shape[1] + self.down_t.read_bytes(down, tokens)
        else:
            rows = (2 * active + down) * self.d * self.dense.w_down_t.element_size()
        return {"sparse_ffn_tokens": tokens, "ffn_neurons": tokens * self.I, "ffn_predicted": active,
                "ffn_gate_up_rows": active, "ffn_down_rows": down,
                "weight_bytes": tokens * self.predictor_bytes() + rows}

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, d={self.d}, I={self.I}, rank={self.rank}, act={self.activation}, "
                f"tau={self.tau:.4g}, per_token={self.per_token}")


class Q4SparseFFN(SparseFFN):
    """4-bit gate x up predictor (sdk/sparsedge/ffn/q4.py): ffn_predict_q4, then sparse_ffn_rows on its index list."""

    def __init__(self, dense: nn.Module, q: torch.Tensor, scale: torch.Tensor, thresh: torch.Tensor,
                 per_token: bool = False, layer_index: int = -1):
        nn.Module.__init__(self)
        self._setup(dense, 0.0, per_token, layer_index)
        try:
            q4.validate(q, scale, thresh, self.I, self.d)
        except ValueError as exc:
            raise ValueError(f"layer {layer_index}: {exc}") from None
        self.q, self.scale, self.thresh = q, scale, thresh

    @property
    def rank(self) -> int:
        return 0

    @property
    def group(self) -> int:
        return self.d // self.scale.shape[2]

    def predictor_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.scale, self.thresh

    def sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.dense
        idx, count = ops.ffn_predict_q4(x, self.q, self.scale, self.thresh, self.activation, self.act_param)
        y, down_count = ops.sparse_ffn_rows(x, idx, count, d.w_gate, d.w_up, d.w_down_t, self.activation,
                                            self.act_param, 0.0)
        return y, count, down_count

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, d={self.d}, I={self.I}, q4 group={self.group}, act={self.activation}, "
                f"per_token={self.per_token}")


def set_per_token(model, on: bool = True) -> None:
    """Run every SparseFFN of `model` per token in prefill too (what evaluation uses)."""
    for layer in model.layers:
        if hasattr(layer.ffn, "per_token"):
            layer.ffn.per_token = on


def attach_predictors(model, path, backend=None, *, per_token: bool = False) -> dict:
    """Replace each `layer.ffn` of `model` with a SparseFFN built from the artifact at `path`.

    Returns the FFN section's meta. Raises sparsedge.artifact.ArtifactError for a missing, corrupt or
    mismatched artifact, or one without an FFN section."""
    from sparsedge.artifact import ArtifactError, load_section
    from sparsedge.backends import get_backend

    be = get_backend(backend) if backend is not None else None
    loaded = load_section(path, model, "ffn")
    if loaded is None:
        raise ArtifactError(f"artifact {path} has no 'ffn' section (it holds other calibration only); "
                            f"calibrate FFN predictors into it with tools/calibrate.py --out {path}")
    tensors, meta = loaded
    kind = predictor_kind(tensors)
    quantized = any(getattr(getattr(layer.ffn, "dense", layer.ffn), "quantized", False) for layer in model.layers)
    if quantized and not runs_on_block_weights(kind, model.config.activation, meta.get("tau")):
        raise ArtifactError(f"FFN predictors ({path}, {kind}) run on float weights, and this session keeps its "
                            f"weights quantized; load it with dtype='float32' (or --dtype float32) to use them, or "
                            f"calibrate the quantized path's artifact (tools/calibrate.py --predictor down)")
    try:
        attach_tensors(model, tensors, meta.get("tau"), be, per_token=per_token)
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"artifact {path}: {exc}; re-run tools/calibrate.py for this model") from None
    if be is not None:
        if kind == "down":
            be.require(*(("qsparse_ffn",) if quantized else ("linear_t",)))
        elif quantized:
            be.require("ffn_predict", "qsparse_ffn_rows")
        elif kind == "q4":
            be.require("ffn_predict_q4", "sparse_ffn_rows")
        else:
            be.require("ffn_predict", "sparse_ffn_rows", "sparse_ffn")
    return meta


def runs_on_block_weights(kind: str, activation: str, taus=None) -> bool:
    """Whether an FFN artifact of `kind` runs on quantized (block) weights: down-row thresholds always; SVD
    predictors on the relu family without a runtime tau (qsparse_ffn_rows); the 4-bit predictor never (its
    kernel gathers float rows). Session.load asks this before loading, attach_predictors after."""
    return kind == "down" or (kind == "svd" and activation in RELU_FAMILY and not any(taus or []))


def predictor_kind(tensors: dict) -> str:
    """"down" for down-row thresholds (DownSkipFFN), "q4" for 4-bit gate/up predictors, else "svd"."""
    if "layers.0.down_thresh" in tensors:
        return "down"
    return "q4" if "layers.0.q" in tensors else "svd"


def attach_tensors(model, tensors: dict, taus=None, backend=None, per_token: bool = False) -> None:
    """Replace each layer's FFN with a SparseFFN (layers.{i}.p1/p2/bias) or a Q4SparseFFN
    (layers.{i}.q/scale/thresh) from artifact-style tensors."""
    taus = taus or [0.0] * model.config.n_layers
    wdtype = model.dtype
    kind = predictor_kind(tensors)
    names = {"q4": ("q", "scale", "thresh"), "down": ("down_thresh",), "svd": ("p1", "p2", "bias")}[kind]
    for i, layer in enumerate(model.layers):
        keys = [f"layers.{i}.{k}" for k in names]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise KeyError(f"FFN section lacks {missing}")
        dense = getattr(layer.ffn, "dense", layer.ffn)
        if backend is not None:
            place = backend.place
        else:
            dev = dense.w_down_t.device if dense.w_down_t is not None else dense.w_down.device
            place = lambda t, dt: t.to(device=dev, dtype=dt).contiguous()  # noqa: E731
        if kind == "down":
            from sparsedge.ffn.downskip import DownSkipFFN
            layer.ffn = DownSkipFFN(dense, place(tensors[keys[0]], torch.float32), per_token=per_token,
                                    layer_index=i)
            continue
        a, b, c = (tensors[k] for k in keys)
        if kind == "q4":
            layer.ffn = Q4SparseFFN(dense, place(a, torch.uint8), place(b, torch.float32), place(c, torch.float32),
                                    per_token=per_token, layer_index=i)
        else:
            # on block weights the predictor is kept in bf16: in fp32 it would be a quarter of what a sparse Q4
            # token reads (docs/results/sparse_quant.md §5)
            pdtype = torch.bfloat16 if getattr(dense, "quantized", False) else wdtype
            layer.ffn = SparseFFN(dense, place(a, pdtype), place(b, pdtype), place(c, torch.float32),
                                  tau=float(taus[i]), per_token=per_token, layer_index=i)


def detach_predictors(model) -> None:
    """Put every layer's DenseFFN back."""
    for layer in model.layers:
        layer.ffn = getattr(layer.ffn, "dense", layer.ffn)
