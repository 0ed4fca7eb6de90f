"""TernaryWeight: a BitNet b1.58 projection [N, K] kept as 2-bit ternary codes plus one float scale per row, run by
`sparsedge::bitlinear` (sdk/sparsedge/ops/bitlinear.py, which documents the arithmetic).

  data   uint8 [N / 4, K]: byte (g, k) holds W[4 g + i, k] + 1 in bits 2i..2i+1 (i = 0..3), W in {-1, 0, +1}
  scale  fp32 [N]: BitLinear's weight_scale of the projection row n belongs to; y_n = (W_n . q) / (scale[n] * s_x)

Four consecutive rows share a byte row, so projections concatenate by rows (q/k/v into one wqkv, gate/up into one
w_gate_up) as plain byte concatenations, each keeping its own scale. transformers' checkpoints pack the other way
(byte (r, k) holds rows r, r + N/4, r + N/2, r + 3N/4: `transformers.integrations.bitnet.pack_weights`);
`from_transformers` converts at load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsedge.quant.qweight import RowWeight

VALUES_PER_BYTE = 4


def pack(w: torch.Tensor) -> torch.Tensor:
    """Ternary values [N, K] (N a multiple of 4; any integer or float dtype holding -1/0/+1) -> uint8 [N / 4, K]."""
    if w.dim() != 2 or w.shape[0] % VALUES_PER_BYTE:
        raise ValueError(f"ternary pack: need [N, K] with N a multiple of 4, got {list(w.shape)}")
    w = w.to(torch.int16)
    if w.numel() and int(w.abs().max()) > 1:
        raise ValueError("ternary pack: values must be -1, 0 or +1")
    codes = (w + 1).to(torch.uint8).reshape(-1, VALUES_PER_BYTE, w.shape[1])
    out = codes[:, 0].clone()
    for i in range(1, VALUES_PER_BYTE):
        out |= codes[:, i] << (2 * i)
    return out


def unpack(data: torch.Tensor) -> torch.Tensor:
    """uint8 [N / 4, K] -> int8 [N, K] in {-1, 0, +1} (a code 3 reads as +2; pack never writes it)."""
    fields = [((data >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    return (torch.stack(fields, 1).to(torch.int8) - 1).reshape(-1, data.shape[-1])


def unpack_transformers(packed: torch.Tensor) -> torch.Tensor:
    """transformers' packing (uint8 [N / 4, K], row i * N/4 + r in bits 2i of byte row r) -> int8 [N, K]."""
    fields = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    return torch.cat(fields, 0).to(torch.int8) - 1


def absmean_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet's weight quantization (transformers' WeightQuant, in fp32): s = 1 / max(mean |W|, 1e-5),
    W_t = clamp(round(W s), -1, 1). Returns (int8 W_t [N, K], s as an fp32 0-d tensor)."""
    wf = w.float()
    s = 1.0 / wf.abs().mean().clamp_(min=1e-5)
    return (wf * s).round().clamp(-1, 1).to(torch.int8), s


@dataclass
class TernaryWeight(RowWeight):
    data: torch.Tensor  # uint8 [N / 4, K]
    scale: torch.Tensor  # fp32 [N]
    K: int

    def __post_init__(self):
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] != self.K:
            raise ValueError(f"ternary weight with rows of K={self.K} needs uint8 [N/4, {self.K}] codes, got "
                             f"{self.data.dtype} {list(self.data.shape)}")
        if self.scale.dtype != torch.float32 or self.scale.shape != (self.N,):
            raise ValueError(f"ternary weight [{self.N}, {self.K}] needs an fp32 scale [{self.N}], got "
                             f"{self.scale.dtype} {list(self.scale.shape)}")

    @property
    def N(self) -> int:
        return self.data.shape[0] * VALUES_PER_BYTE


    @property
    def nbytes(self) -> int:
        return self.data.numel() + self.scale.numel() * 4

    def rows(self, index: slice) -> "TernaryWeight":
        """Rows start..stop of a slice, both multiples of 4 (whole byte rows)."""
        start, stop, step = index.indices(self.N)
        if step != 1 or start % VALUES_PER_BYTE or stop % VALUES_PER_BYTE:
            raise ValueError(f"ternary rows come in groups of 4; cannot take rows {start}:{stop}:{step}")
        return TernaryWeight(self.data[start // 4:stop // 4].contiguous(), self.scale[start:stop].contiguous(), self.K)

    def scale_rows_(self, factors: torch.Tensor) -> "TernaryWeight":
        """Multiply row n by factors[n], a power of two, in place and exactly (the row's scale divided by it: the
        product scale * s_x and the quotient scale by a power of two exactly, away from fp32's limits)."""
        f = torch.as_tensor(factors, dtype=torch.float32).reshape(-1).to(self.scale.device)
        if f.numel() != self.N or not torch.equal(torch.exp2(torch.round(torch.log2(f))), f):
            raise ValueError(f"scale_rows_: need {self.N} power-of-two factors")
        new = self.scale / f
        if not torch.equal(new * f, self.scale) or not bool((new.abs() >= torch.finfo(torch.float32).tiny).all()):
            raise ValueError(f"scaling ternary rows by {f.min():g}..{f.max():g} leaves fp32's exact range")
        self.scale.copy_(new)
        return self

    def ternary(self) -> torch.Tensor:
        """int8 [N, K] in {-1, 0, +1}."""
        return unpack(self.data)

    def dequantize(self) -> torch.Tensor:
        """The float weight BitLinear approximates, W / scale (fp32 [N, K]); bitlinear itself never forms it."""
        return unpack(self.data).float() / self.scale[:, None]

    def to(self, device=None) -> "TernaryWeight":
        return TernaryWeight(self.data.to(device).contiguous(), self.scale.to(device).contiguous(), self.K)

    @staticmethod
    def from_ternary(w: torch.Tensor, scale) -> "TernaryWeight":
        """Ternary values [N, K] and BitLinear's divisor scale (one number, or one per row)."""
        s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if s.numel() == 1:
            s = s.expand(w.shape[0])
        return TernaryWeight(pack(w), s.contiguous().clone(), w.shape[1])

    @staticmethod
    def from_transformers(packed: torch.Tensor, scale) -> "TernaryWeight":
        """transformers' packed BitLinear weight (uint8 [N / 4, K]) and its divisor scale."""
        return TernaryWeight.from_ternary(unpack_transformers(packed), scale)

    @staticmethod
    def cat(parts: list) -> "TernaryWeight | None":
        """The row concatenation of TernaryWeights of one K, or None when they are not all ternary or differ."""
        if not parts or any(not isinstance(p, TernaryWeight) for p in parts) or len({p.K for p in parts}) != 1:
            return None
        return TernaryWeight(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]), parts[0].K)

    def __repr__(self) -> str:
        return f"TernaryWeight([{self.N}, {self.K}], {self.nbytes} bytes)"


def holds_ternary(w) -> bool:
    """Whether a weight (a tensor, QWeight, TernaryWeight, or a tuple of them) has ternary parts."""
    return isinstance(w, TernaryWeight) or (isinstance(w, (tuple, list)) and any(map(holds_ternary, w)))


def refuse_ternary(dense, layer_index: int, what: str) -> None:
    """ValueError when a DenseFFN's projections are ternary: `what` (a sparse FFN path) does not implement them."""
    if holds_ternary(dense.w_gate_up) or holds_ternary(getattr(dense, "w_down", None)):
        raise ValueError(f"layer {layer_index}: the FFN's projections are BitNet b1.58 ternary weights "
                         f"(sparsedge::bitlinear), which {what} does not implement")
