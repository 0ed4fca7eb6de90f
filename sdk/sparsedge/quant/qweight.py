"""QWeight: a weight matrix [N, K] kept in its quantized blocks (a GGUF file's bytes, or quantized at load).

The decoder holds either a float tensor or a QWeight wherever a projection lives; `sparsedge.model.linear`
sends the first to `sparsedge::linear` and the second to `sparsedge::qlinear`. Rows are independent in
every block format, so row gathers, row permutations and concatenations of equal formats are exact byte
operations (no requantization).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsedge.quant import formats as qf


# byte offsets of the fp16 fields (scale, and min where there is one) inside each block
_SCALE_OFFSETS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,), "tq2_0": (64,)}


class RowWeight:
    """What every non-float weight kind shares: `data` on a device, N rows of K, activations in fp32
    (subclasses give N and nbytes)."""

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in against this weight."""
        return torch.float32

    def numel(self) -> int:
        return self.N * self.K


@dataclass
class QWeight(RowWeight):
    data: torch.Tensor  # uint8 [N, row_bytes]
    qtype: str
    K: int

    def __post_init__(self):
        fmt = qf.get_format(self.qtype)
        rb = fmt.row_bytes(self.K)
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] != rb:
            raise ValueError(f"{self.qtype} weight with rows of K={self.K} needs uint8 [N, {rb}] bytes, got "
                             f"{self.data.dtype} {list(self.data.shape)}")
        self.qtype = fmt.name

    @property
    def N(self) -> int:
        return self.data.shape[0]


    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, index) -> "QWeight":
        return QWeight(self.data[index].contiguous(), self.qtype, self.K)

    def scale_rows_(self, factors: torch.Tensor) -> "QWeight":
        """Multiply row n by factors[n], a power of two, in place and exactly: every block format stores its
        values as an fp16 scale (and min) times integers, so scaling the fp16 fields by 2^k scales the row.
        Raises ValueError when a scaled field would leave fp16's exact range (overflow or subnormal loss)."""
        f = torch.as_tensor(factors, dtype=torch.float32).reshape(-1)
        if f.numel() != self.N or not torch.equal(torch.exp2(torch.round(torch.log2(f))), f):
            raise ValueError(f"scale_rows_: need {self.N} power-of-two factors")
        fmt = qf.get_format(self.qtype)
        if not fmt.quantized:
            vals = self.data.view(qf.FLOAT_DTYPES[self.qtype])
            scaled = (vals.float() * f[:, None]).to(vals.dtype)
            if not torch.equal(scaled.float() / f[:, None], vals.float()):
                raise ValueError(f"scaling {self.qtype} rows by {f.min():g}..{f.max():g} is not exact")
            vals.copy_(scaled)
            return self
        blocks = self.data.view(self.N, -1, fmt.type_size)
        for off in _SCALE_OFFSETS[self.qtype]:
            field = blocks[:, :, off:off + 2].contiguous().view(torch.float16)  # [N, blocks, 1]
            scaled = (field.float() * f[:, None, None]).half()
            if not torch.equal(scaled.float(), field.float() * f[:, None, None]):
                raise ValueError(f"scaling {self.qtype} rows by {f.min():g}..{f.max():g} leaves fp16's exact range")
            blocks[:, :, off:off + 2] = scaled.view(torch.uint8)
        return self

    def dequantize(self) -> torch.Tensor:
        return qf.dequantize(self.data, self.qtype, self.K)

    def to(self, device=None) -> "QWeight":
        return QWeight(self.data.to(device).contiguous(), self.qtype, self.K)

    @staticmethod
    def quantize(w: torch.Tensor, qtype: str) -> "QWeight":
        return QWeight(qf.quantize(w.float().contiguous(), qtype), qtype, w.shape[1])

    @staticmethod
    def cat(parts: list) -> "QWeight | None":
        """The row concatenation of QWeights of one format and K, or None when they differ."""
        if not parts or any(not isinstance(p, QWeight) for p in parts):
            return None
        if len({(p.qtype, p.K) for p in parts}) != 1:
            return None
        return QWeight(torch.cat([p.data for p in parts]), parts[0].qtype, parts[0].K)

    def __repr__(self) -> str:
        return f"QWeight({self.qtype}, [{self.N}, {self.K}], {self.nbytes} bytes)"


def nbytes(w) -> int:
    """Bytes of a weight as stored: a QWeight or TernaryWeight, a float tensor, or a tuple of them."""
    if w is None:
        return 0
    if isinstance(w, (tuple, list)):
        return sum(nbytes(p) for p in w)
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes


def dequantized(w) -> torch.Tensor:
    """fp32 values of a weight (a QWeight or TernaryWeight, a float tensor, or a tuple of them concatenated by
    rows)."""
    if isinstance(w, (tuple, list)):
        return torch.cat([dequantized(p) for p in w])
    if isinstance(w, torch.Tensor):
        return w
    return w.dequantize()
