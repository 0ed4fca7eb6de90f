"""DownT: a block-quantized W_down [d, I] rearranged so that one neuron's down weights are one contiguous row,
with every value unchanged (no requantization).

Why: the sparse FFN skips the down weights of inactive neurons, i.e. columns of W_down. A GGUF file stores
W_down row-major in blocks of 32 along I (each block: 32 codes of one output r sharing an fp16 scale, and a min
for q4_1), so a neuron's 576 weights lie in 576 different blocks. Requantizing W_downᵀ along d would cost
perplexity; transposing the codes alone costs nothing. A value is

    W_down[r, i] = scale[b, r] * code[i, r] + min[b, r],   b = i // 32

exactly as the file's block (b of row r) defines it: q4_1 (d, m), q4_0 (d, -8 d: the offset as a min), q8_0
(d, no min). Reading a neuron then costs its codes (d/2 bytes at 4 bits, d at 8 bits) plus, once per block
of 32 neurons with any active one, that block's scales and mins (the same bytes the dense kernel reads per
block): at SmolLM2's shape, q4_1, a dense layer is 553 KB and 40% active neurons read 177 KB of codes plus
110 KB of scales.

Layout (sparsedge::qsparse_ffn, sdk/sparsedge/ops/qffn.py):
    codes  4-bit formats: uint8 [I, d/2]; outputs in groups of 32, byte j of a group holds output j in its low
           nibble and output j + 16 in its high nibble (the GGUF q4 block order). q8_0: int8 [I, d].
    scale  fp16 [I/32, d]
    minv   fp16 [I/32, d] (q4_0: -8 d, exact in fp16), or an empty tensor for q8_0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsedge.quant import formats as qf
from sparsedge.quant.qweight import QWeight

DOWN_FORMATS = ("q4_0", "q4_1", "q8_0")


@dataclass
class DownT:
    codes: torch.Tensor
    scale: torch.Tensor
    minv: torch.Tensor
    qtype: str  # the file's format of W_down

    @property
    def I(self) -> int:  # noqa: E743 - the FFN's name for it
        return self.codes.shape[0]

    @property
    def d(self) -> int:
        return self.scale.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minv))

    def row_bytes(self) -> int:
        """Code bytes of one neuron."""
        return self.codes.shape[1] * self.codes.element_size()

    def block_bytes(self) -> int:
        """Scale and min bytes of one block of 32 neurons."""
        return (self.scale.shape[1] + (self.minv.shape[1] if self.minv.numel() else 0)) * 2

    def read_bytes(self, rows: int, tokens: int) -> int:
        """Bytes `tokens` sparse steps read that ran `rows` neuron rows in all: their codes, and every block's scales
        and mins once per token (a block of 32 neurons is practically never skipped whole)."""
        return rows * self.row_bytes() + tokens * (self.I // 32) * self.block_bytes()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scale, self.minv

    @staticmethod
    def from_qweight(w: QWeight) -> "DownT":
        """W_down [d, I] as the file stores it -> DownT. Raises ValueError for other formats."""
        if w.qtype not in DOWN_FORMATS:
            raise ValueError(f"W_down is stored as {w.qtype}; the quantized sparse FFN reads W_down by neuron in "
                             f"{', '.join(DOWN_FORMATS)} only")
        d, I = w.N, w.K
        if d % qf.QK:
            raise ValueError(f"the quantized sparse FFN needs a hidden size that is a multiple of {qf.QK}, got {d}")
        fmt = qf.get_format(w.qtype)
        b = w.data.reshape(d, I // qf.QK, fmt.type_size)
        scale = b[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [d, I/32]
        if w.qtype == "q8_0":
            codes = b[..., 2:].contiguous().view(torch.int8).reshape(d, I).t().contiguous()  # [I, d]
            minv = torch.empty(0, 0, dtype=torch.float16)
            return DownT(codes, scale.t().contiguous(), minv, w.qtype)
        if w.qtype == "q4_1":
            minv = b[..., 2:4].contiguous().view(torch.float16)[..., 0]
            qs = b[..., 4:]
        else:  # q4_0: value = d (q - 8) = d q + (-8 d); -8 d is exact in fp16 unless it overflows
            minv = scale * -8
            if not torch.isfinite(minv).all():
                raise ValueError("W_down (q4_0) has a block scale whose -8x offset overflows fp16")
            qs = b[..., 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(d, I)  # [d, I] codes 0..15, GGUF element order
        return DownT(pack_nibbles(q.t().contiguous()), scale.t().contiguous(), minv.t().contiguous(), w.qtype)

    def code_values(self) -> torch.Tensor:
        """int codes [I, d] (0..15 for the 4-bit formats, signed for q8_0)."""
        if self.codes.dtype == torch.int8:
            return self.codes
        return unpack_nibbles(self.codes)

    def dequantize(self) -> torch.Tensor:
        """W_downᵀ [I, d] fp32, bit-identical to the file's dequantized values transposed."""
        q = self.code_values().float()
        scale = self.scale.float().repeat_interleave(qf.QK, 0)
        out = scale * q
        if self.minv.numel():
            out = out + self.minv.float().repeat_interleave(qf.QK, 0)
        return out

    def to(self, device) -> "DownT":
        return DownT(*(t.to(device).contiguous() for t in self.tensors()), self.qtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [I, d] values 0..15 -> [I, d/2]: per group of 32, byte j = q[j] | q[j + 16] << 4."""
    I, d = q.shape
    g = q.reshape(I, d // qf.QK, 2, qf.QK // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(I, d // 2)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    I, half = p.shape
    g = p.reshape(I, half // (qf.QK // 2), qf.QK // 2)
    return torch.stack([g & 0x0F, g >> 4], dim=2).reshape(I, 2 * half)
