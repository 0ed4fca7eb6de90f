"""GGUF block formats that load but do not run in their own blocks, because `sparsedge::qlinear` has no kernel for
them. q5_0 becomes q8_0 blocks with the same scale (its values d * (q - 16) are q8_0's d * code with code = q - 16:
exact, at 34 bytes per 32 values instead of 22, against 128 in fp32); tq1_0 (BitNet b1.58's base-3 packing) becomes
tq2_0 blocks with the same scale and the same ternary codes (exact, 66 bytes per 256 values instead of 54); q5_1 (a
min per block, which q8_0 cannot hold) is dequantized to fp32 when read. Either way the values are the file's.

llama.cpp falls back to these where a K-quant does not fit a row length (a Q4_K_M file of Gemma-3-270M, d = 640,
stores its q/k/gate/up projections as Q5_0: 640 is not a multiple of Q4_K's 256-element super-block).

  q5_0  32 elems, 22 B  d fp16 | qh u8[4] | qs u8[16]        q = (low nibble of qs[e] for e < 16, high nibble of
                                                              qs[e - 16] above) | (bit e of qh, little-endian) << 4;
                                                              value = d * (q - 16)
  q5_1  32 elems, 24 B  d fp16 | m fp16 | qh u8[4] | qs u8[16]   q as q5_0; value = (d * q) + m
  tq1_0 256 elems, 54 B  qs u8[48] | qh u8[4] | d fp16          five base-3 digits per byte of qs (four per byte
                         of qh), most significant first: digit j of byte b is ((b * 3^j mod 256) * 3) >> 8;
                         element 32 j + m = digit j of qs[m] (j < 5, m < 32), 160 + 16 j + m = digit j of
                         qs[32 + m] (j < 5, m < 16), 240 + 4 j + m = digit j of qh[m] (j < 4, m < 4);
                         value = d * (digit - 1)

dequantize() is bit-identical to the `gguf` package's numpy reference (tests/test_architectures.py and
tests/test_gguf_phi3_bitnet.py check it).
"""
from __future__ import annotations

import torch

from sparsedge.quant.formats import QFormat

FORMATS: dict[str, QFormat] = {f.name: f for f in (QFormat("q5_0", 6, 32, 22), QFormat("q5_1", 7, 32, 24),
                                                   QFormat("tq1_0", 34, 256, 54))}
BY_GGML: dict[int, QFormat] = {f.ggml_type: f for f in FORMATS.values()}


def row_bytes(qtype: str, K: int) -> int:
    fmt = FORMATS[qtype]
    if K <= 0 or K % fmt.block:
        raise ValueError(f"{qtype}: the row length K={K} must be a positive multiple of its block size {fmt.block}")
    return K // fmt.block * fmt.type_size


def _codes(b: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 [M, nb, 32] 5-bit codes q of q5_0 / q5_1 blocks b [M, nb, type_size]."""
    o = 2 if qtype == "q5_0" else 4
    qh = b[..., o:o + 4].contiguous().view(torch.int32)[..., 0].to(torch.int64) & 0xFFFFFFFF
    bits = ((qh[..., None] >> torch.arange(32, device=b.device)) & 1).to(torch.uint8)
    qs = b[..., o + 4:]
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1) | (bits << 4)


def _tq1_0_digits(b: torch.Tensor) -> torch.Tensor:
    """uint8 [M, nb, 256] base-3 digits (0, 1, 2) of tq1_0 blocks b [M, nb, 54], in element order."""
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=b.device)

    def digits(v: torch.Tensor, n: int) -> torch.Tensor:  # v [M, nb, m] -> [M, nb, n * m], digit-major
        p = (v.to(torch.int32)[..., None, :] * pow3[:n, None]) & 0xFF  # the uint8 product of the reference
        return ((p * 3) >> 8).flatten(-2)

    return torch.cat([digits(b[..., 0:32], 5), digits(b[..., 32:48], 5), digits(b[..., 48:52], 4)],
                     dim=-1).to(torch.uint8)


def tq1_0_as_tq2_0(raw: torch.Tensor, K: int) -> torch.Tensor:
    """tq1_0 rows [N, K / 256 * 54] -> tq2_0 rows [N, K / 256 * 66] holding the same values (scale d, the same
    codes: tq2_0's q - 1 is tq1_0's digit - 1)."""
    if raw.dtype != torch.uint8 or raw.shape[-1] != row_bytes("tq1_0", K):
        raise ValueError(f"tq1_0: rows of K={K} take {row_bytes('tq1_0', K)} uint8 bytes, got {raw.dtype} "
                         f"{list(raw.shape)}")
    b = raw.reshape(-1, K // 256, 54)
    q = _tq1_0_digits(b).reshape(-1, K // 256, 2, 4, 32)  # element 128 c + 32 l + m -> [c, l, m]
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)  # [.., c, m]
    return torch.cat([qs.flatten(-2), b[..., 52:54]], dim=-1).reshape(*raw.shape[:-1], K // 256 * 66)


def q5_0_as_q8_0(raw: torch.Tensor, K: int) -> torch.Tensor:
    """q5_0 rows [N, K / 32 * 22] -> q8_0 rows [N, K / 32 * 34] holding the same values (scale d, codes q - 16)."""
    if raw.dtype != torch.uint8 or raw.shape[-1] != row_bytes("q5_0", K):
        raise ValueError(f"q5_0: rows of K={K} take {row_bytes('q5_0', K)} uint8 bytes, got {raw.dtype} "
                         f"{list(raw.shape)}")
    b = raw.reshape(-1, K // 32, 22)
    codes = (_codes(b, "q5_0").to(torch.int16) - 16).to(torch.int8).view(torch.uint8)
    return torch.cat([b[..., 0:2], codes], dim=-1).reshape(*raw.shape[:-1], K // 32 * 34)


def dequantize(raw: torch.Tensor, qtype: str, K: int) -> torch.Tensor:
    """raw uint8 [..., K / block * type_size] -> float32 [..., K]."""
    fmt = FORMATS[qtype]
    if raw.dtype != torch.uint8 or raw.shape[-1] != row_bytes(qtype, K):
        raise ValueError(f"{qtype}: rows of K={K} take {row_bytes(qtype, K)} uint8 bytes, got {raw.dtype} "
                         f"{list(raw.shape)}")
    lead = raw.shape[:-1]
    b = raw.reshape(-1, K // fmt.block, fmt.type_size)
    if qtype == "tq1_0":
        d = b[..., 52:54].contiguous().view(torch.float16)[..., 0].float()
        out = d[..., None] * (_tq1_0_digits(b).to(torch.int8) - 1).float()
        return out.reshape(*lead, K)
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    q = _codes(b, qtype)
    if qtype == "q5_0":
        out = d[..., None] * (q.to(torch.int8) - 16).float()
    else:
        m = b[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        out = (d[..., None] * q.float()) + m[..., None]
    return out.reshape(*lead, K)


# load-only formats whose values a qlinear format holds exactly: qtype -> (that format, the conversion of the rows)
AS_NATIVE = {"q5_0": ("q8_0", q5_0_as_q8_0), "tq1_0": ("tq2_0", tq1_0_as_tq2_0)}
