"""DownSkipFFN: dense gate and up, then only the down rows of neurons whose exact contribution is large.

Neuron i of a token runs its W_down row when |h_i| > thresh_i, with thresh_i = t_layer / ‖W_down[:, i]‖, i.e.
when its true contribution |h_i|·‖W_down[:, i]‖ passes the layer's cut (sparsedge.calibrate.downskip fits
t_layer). This is the true-contribution oracle of docs/results/ffn.md §3b applied to the down third: no
prediction error, and no predictor bytes, which on 4-bit weights cost as much as the rows they save.

Decode (T = 1, or every token with `per_token`) on quantized weights is one `sparsedge::qsparse_ffn` call per
layer: gate, up, threshold and the kept down rows, W_down read by neuron from the exact rearrangement of
sparsedge.quant.down_t. On float weights (a dequantized session) the same decision runs through the dense
ops (exact, no speed gain). Prefill (T > 1) without `per_token` runs the dense FFN, as SparseFFN does.
"""
from __future__ import annotations

import torch
from loguru import logger
from torch import nn

from sparsedge.ops.qffn import GATE_UP_FORMATS
from sparsedge.quant.down_t import DOWN_FORMATS, DownT
from sparsedge.model import linear
from sparsedge.quant.qweight import QWeight, nbytes
from sparsedge.quant.ternary import refuse_ternary

ops = torch.ops.sparsedge


def check_quantized_layout(dense, layer_index: int = -1) -> None:
    """ValueError naming what a quantized layer lacks for qsparse_ffn (gate/up in one block format, W_down in a
    32-block format)."""
    w = dense.w_gate_up
    if not isinstance(w, QWeight):
        kinds = "/".join(p.qtype for p in w) if isinstance(w, tuple) else type(w).__name__
        raise ValueError(f"layer {layer_index}: gate and up are stored in different formats ({kinds}); the quantized "
                         f"sparse FFN needs them in one")
    if w.qtype not in GATE_UP_FORMATS:
        raise ValueError(f"layer {layer_index}: gate/up are {w.qtype}; the quantized sparse FFN reads "
                         f"{', '.join(GATE_UP_FORMATS)}")
    if dense.w_down.qtype not in DOWN_FORMATS:
        raise ValueError(f"layer {layer_index}: W_down is {dense.w_down.qtype}; the quantized sparse FFN reads W_down "
                         f"by neuron in {', '.join(DOWN_FORMATS)} only")


def down_by_neuron(dense, layer_index: int = -1) -> DownT:
    """W_down of a quantized DenseFFN by neuron (what qsparse_ffn / qsparse_ffn_rows read), after checking the
    layer's formats (check_quantized_layout)."""
    check_quantized_layout(dense, layer_index)
    return DownT.from_qweight(dense.w_down).to(dense.w_down.device)


_WARNED: set = set()


def masked_down(dense) -> bool:
    """Whether a DenseFFN's down-skip runs masked: quantized gate/up in one format, W_down in a format without a
    by-neuron layout (a Q4_K_M file's q4_k / q6_k). The thresholds then run exactly, but every row is still read."""
    return dense.quantized and isinstance(dense.w_gate_up, QWeight) and dense.w_down.qtype not in DOWN_FORMATS


def warn_masked(qtype: str) -> None:
    """Once per format: the thresholds run exactly, but without a by-neuron layout every W_down row is read."""
    if qtype not in _WARNED:
        _WARNED.add(qtype)
        logger.warning(f"down-row skipping on a {qtype} W_down: the skip decision is exact but every row is still read "
                       f"(no speed gain); a by-neuron layout exists for {', '.join(DOWN_FORMATS)} only")


class DownSkipFFN(nn.Module):
    def __init__(self, dense: nn.Module, thresh: torch.Tensor, per_token: bool = False, layer_index: int = -1):
        super().__init__()
        refuse_ternary(dense, layer_index, "the down-skip FFN path")
        if getattr(dense, "sub_norm", None) is not None:
            raise ValueError(f"layer {layer_index}: the FFN normalises h before W_down (BitNet's ffn_sub_norm), "
                             "which the sparse FFN path does not implement")
        self.dense = dense
        self.I = dense.I
        if thresh.shape != (self.I,):
            raise ValueError(f"layer {layer_index}: down thresholds have shape {tuple(thresh.shape)}, the FFN has "
                             f"I={self.I} neurons")
        self.thresh = thresh.float().contiguous()
        self.per_token = per_token
        self.layer_index = layer_index
        self.down_t = None
        if dense.quantized:
            self.d = dense.w_down.N
            if masked_down(dense):  # the same decision, every row still read (see sparse())
                warn_masked(dense.w_down.qtype)
            else:
                self.down_t = down_by_neuron(dense, layer_index)
        else:
            self.d = dense.w_down_t.shape[1]
        self.reset_stats()

    @property
    def rank(self) -> int:
        return 0

    def weight_bytes(self) -> int:
        return self.dense.weight_bytes()

    def predictor_bytes(self) -> int:
        return 0

    def sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, kept down rows per token) for x [T, d]."""
        d = self.dense
        if self.down_t is not None:
            w = d.w_gate_up
            return ops.qsparse_ffn(x, w.data, w.qtype, *self.down_t.tensors(), self.thresh, d.activation,
                                   d.act_param)
        h = d.hidden(x)[1]
        keep = h.abs() > self.thresh.to(h.dtype)
        h = torch.where(keep, h, torch.zeros_like(h))
        y = linear(h, d.w_down) if d.quantized else ops.linear_t(h, d.w_down_t)
        return y, keep.sum(1, dtype=torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 or self.per_token:
            y, kept = self.sparse(x)
            self._acc[0] += x.shape[0]
            self._acc[1] += kept.sum(dtype=torch.int64).cpu()
            return y
        return self.dense(x)

    # --- statistics -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        # [tokens, kept down rows], a CPU tensor: sparsedge.fused_step's C++ loop adds to it in place
        if getattr(self, "_acc", None) is None:
            self._acc = torch.zeros(2, dtype=torch.int64)
        self._acc.zero_()

    def stats(self) -> dict:
        tokens, kept = (int(v) for v in self._acc.tolist())
        if self.down_t is not None:
            down = self.down_t.read_bytes(kept, tokens)
        elif self.dense.quantized:  # masked rows are still read
            down = tokens * nbytes(self.dense.w_down)
        else:
            down = kept * self.d * self.dense.w_down_t.element_size()
        return {"sparse_ffn_tokens": tokens, "ffn_neurons": tokens * self.I, "ffn_predicted": tokens * self.I,
                "ffn_gate_up_rows": tokens * self.I, "ffn_down_rows": kept,
                "weight_bytes": tokens * nbytes(self.dense.w_gate_up) + down}

    def extra_repr(self) -> str:
        fmt = (f"down {self.down_t.qtype} by neuron" if self.down_t is not None
               else f"down {self.dense.w_down.qtype}, masked" if self.dense.quantized else "float")
        return f"layer={self.layer_index}, d={self.d}, I={self.I}, {fmt}, per_token={self.per_token}"
