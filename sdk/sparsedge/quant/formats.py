"""GGUF (ggml) weight formats, kept in their own blocks: a weight [N, K] is the file's raw bytes, row-major,
a uint8 tensor [N, (K / block) * type_size] (zero-copy from an mmap'd file through torch.frombuffer).

Block layouts (little-endian; fp16 = IEEE half; element e of a block; value = what dequantize returns):

  f32   1 elem,    4 B   the float
  f16   1 elem,    2 B   the half, widened
  bf16  1 elem,    2 B   the bfloat16, widened (bits << 16)
  q8_0  32 elems,  34 B  d fp16 | qs int8[32]                        value = qs[e] * d
  q4_0  32 elems,  18 B  d fp16 | qs u8[16]                          q = low nibble of qs[e] for e < 16,
                                                                     high nibble of qs[e - 16] above;
                                                                     value = d * (q - 8)
  q4_1  32 elems,  20 B  d fp16 | m fp16 | qs u8[16]                 q as q4_0; value = (d * q) + m
  q4_k  256 elems, 144 B d fp16 | dmin fp16 | scales u8[12] | qs u8[128]
                         8 sub-blocks of 32; sub-block j has a 6-bit scale sc[j] and min mn[j]:
                           j < 4: sc = scales[j] & 63,  mn = scales[j + 4] & 63
                           j >= 4: sc = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4,
                                   mn = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4
                         q of sub-block 2i / 2i+1 = low / high nibbles of qs[32 i : 32 i + 32]
                         value = (d * sc[j]) * q - (dmin * mn[j])
  q6_k  256 elems, 210 B ql u8[128] | qh u8[64] | scales int8[16] | d fp16
                         element e = 128 h + r (h in {0, 1}, r < 128):
                           low 4 bits  = ql[64 h + r % 64] >> (4 * (r // 64)) & 15
                           high 2 bits = qh[32 h + r % 32] >> (2 * (r // 32)) & 3
                         q = low | high << 4;  value = (d * scales[e // 16]) * (q - 32)
  tq2_0 256 elems, 66 B  qs u8[64] | d fp16                       (BitNet b1.58's ternary weights)
                         element e = 128 c + 32 l + m (c < 2, l < 4, m < 32): q = qs[32 c + m] >> (2 l) & 3;
                         value = d * (q - 1)   (q in {0, 1, 2} as llama.cpp writes it; 3 reads as +2)

dequantize() does the float operations in the order written above (the order of the `gguf` package's
numpy reference, so results are bit-identical), and quantize() reproduces `gguf.quants.quantize`
(ggml-quants.c's reference rounding) for q8_0 / q4_0 / q4_1 and the float formats.

quantize_activations() is the activation side of the fused kernels: x rounded to int8 per block of 32
(d = amax / 127, q = round-half-even(x * (127 / amax)), s = d * sum(q)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 32     # elements per block of the 32-blocks (q8_0, q4_0, q4_1) and of the activation blocks
QK_K = 256  # elements per super-block of the K-quants


@dataclass(frozen=True)
class QFormat:
    name: str        # lowercase qtype string: "q4_1"
    ggml_type: int   # gguf.GGMLQuantizationType value
    block: int       # elements per block
    type_size: int   # bytes per block

    @property
    def quantized(self) -> bool:
        return self.block > 1

    def row_bytes(self, K: int) -> int:
        check_k(self.name, K)
        return K // self.block * self.type_size


FORMATS: dict[str, QFormat] = {f.name: f for f in (
    QFormat("f32", 0, 1, 4),
    QFormat("f16", 1, 1, 2),
    QFormat("bf16", 30, 1, 2),
    QFormat("q8_0", 8, QK, 34),
    QFormat("q4_0", 2, QK, 18),
    QFormat("q4_1", 3, QK, 20),
    QFormat("q4_k", 12, QK_K, 144),
    QFormat("q6_k", 14, QK_K, 210),
    QFormat("tq2_0", 35, QK_K, 66),
)}
SUPPORTED: tuple[str, ...] = tuple(FORMATS)
# the unquantized formats as torch dtypes (their bytes viewed in place)
FLOAT_DTYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
QUANTIZABLE: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
_BY_GGML = {f.ggml_type: f for f in FORMATS.values()}


class UnsupportedQuantError(ValueError):
    pass


def get_format(qtype) -> QFormat:
    """A QFormat from a qtype string ("q4_1", case-insensitive), a gguf.GGMLQuantizationType or its int value."""
    if isinstance(qtype, QFormat):
        return qtype
    if isinstance(qtype, str):
        fmt = FORMATS.get(qtype.lower())
        label = qtype
    else:  # GGMLQuantizationType (an IntEnum) or a plain int
        fmt = _BY_GGML.get(int(qtype))
        label = getattr(qtype, "name", None) or f"ggml type {int(qtype)}"
    if fmt is None:
        raise UnsupportedQuantError(f"unsupported quantization type {label!r}; supported: {', '.join(SUPPORTED)}")
    return fmt


def qtype_from_ggml(t) -> str:
    """gguf.GGMLQuantizationType (or its int) -> our lowercase qtype string."""
    return get_format(int(t)).name


def check_k(qtype, K: int) -> None:
    fmt = get_format(qtype)
    if K <= 0 or K % fmt.block:
        raise ValueError(f"{fmt.name}: the row length K={K} must be a positive multiple of its block size {fmt.block}")


def row_bytes(qtype, K: int) -> int:
    return get_format(qtype).row_bytes(K)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] (little-endian fp16) -> float32 [...]."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _blocks(raw: torch.Tensor, fmt: QFormat, K: int) -> torch.Tensor:
    if raw.dtype != torch.uint8:
        raise TypeError(f"{fmt.name}: raw weights must be uint8 block bytes, got {raw.dtype}")
    rb = fmt.row_bytes(K)
    if raw.shape[-1] != rb:
        raise ValueError(f"{fmt.name}: rows of K={K} take {rb} bytes, got a last dimension of {raw.shape[-1]}")
    return raw.reshape(-1, K // fmt.block, fmt.type_size)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> uint8 [..., 2n]: the low nibbles, then the high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def q4_k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [..., 12] -> (sc, mn) uint8 [..., 8]: the 6-bit sub-block scales and mins of a q4_k block."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def dequantize(raw: torch.Tensor, qtype, K: int) -> torch.Tensor:
    """raw uint8 [..., row_bytes] -> float32 [..., K], bit-identical to gguf.quants.dequantize."""
    fmt = get_format(qtype)
    lead = raw.shape[:-1]
    b = _blocks(raw, fmt, K)  # [M, nb, type_size]
    M, nb = b.shape[0], b.shape[1]
    name = fmt.name
    if name == "f32":
        out = b.contiguous().view(torch.float32)
    elif name == "f16":
        out = b.contiguous().view(torch.float16).float()
    elif name == "bf16":
        out = b.contiguous().view(torch.bfloat16).float()
    elif name == "q8_0":
        d = _f16(b[..., 0:2])
        q = b[..., 2:].contiguous().view(torch.int8).float()
        out = q * d[..., None]
    elif name == "q4_0":
        d = _f16(b[..., 0:2])
        q = (_nibbles(b[..., 2:]).to(torch.int8) - 8).float()
        out = d[..., None] * q
    elif name == "q4_1":
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        q = _nibbles(b[..., 4:]).float()
        out = (d[..., None] * q) + m[..., None]
    elif name == "q4_k":
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = q4_k_scale_min(b[..., 4:16])
        qs = b[..., 16:].reshape(M, nb, 4, 32)
        q = torch.stack([qs & 0x0F, qs >> 4], dim=-2).reshape(M, nb, 8, 32).float()
        ds = (d[..., None] * sc.float())[..., None]
        dm = (dmin[..., None] * mn.float())[..., None]
        out = ds * q - dm
    elif name == "q6_k":
        ql = b[..., 0:128].reshape(M, nb, 2, 1, 64)
        qh = b[..., 128:192].reshape(M, nb, 2, 1, 32)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        d = _f16(b[..., 208:210])
        lo = torch.cat([ql & 0x0F, ql >> 4], dim=-2).reshape(M, nb, 8, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=raw.device).reshape(4, 1)
        hi = ((qh >> shifts) & 0x03).reshape(M, nb, 8, 32)
        q = ((lo | (hi << 4)).to(torch.int8) - 32).float().reshape(M, nb, 16, 16)
        out = (d[..., None] * sc)[..., None] * q
    elif name == "tq2_0":
        qs = b[..., 0:64].reshape(M, nb, 2, 1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=raw.device).reshape(4, 1)
        q = (((qs >> shifts) & 0x03).to(torch.int8) - 1).float().reshape(M, nb, QK_K)
        out = _f16(b[..., 64:66])[..., None] * q
    else:  # pragma: no cover - FORMATS and this switch list the same names
        raise AssertionError(name)
    return out.reshape(*lead, K)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, exactly (ggml's roundf; floor(|v| + 0.5) misrounds 0.49999997)."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [..., 1] -> uint8 [..., 2] (round to nearest even fp16, little-endian)."""
    return v.to(torch.float16).view(torch.uint8)


def quantize(w: torch.Tensor, qtype) -> torch.Tensor:
    """float [..., K] -> raw uint8 [..., row_bytes], bit-identical to gguf.quants.quantize
    (q8_0, q4_0, q4_1 and the float formats)."""
    fmt = get_format(qtype)
    if fmt.name not in QUANTIZABLE:
        raise UnsupportedQuantError(f"quantizing to {fmt.name} is not implemented; quantize supports: "
                                    f"{', '.join(QUANTIZABLE)}")
    K = w.shape[-1]
    check_k(fmt, K)
    lead = w.shape[:-1]
    w = w.float()
    if fmt.name == "f32":
        return w.contiguous().view(torch.uint8).reshape(*lead, K * 4)
    if fmt.name == "f16":
        return w.to(torch.float16).contiguous().view(torch.uint8).reshape(*lead, K * 2)
    if fmt.name == "bf16":
        n = w.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        nan = (n & 0x7FFFFFFF) > 0x7F800000
        n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)  # quiet NaN, as ggml
        n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16               # round to nearest even
        return n.to(torch.int32).to(torch.int16).view(torch.uint8).reshape(*lead, K * 2)
    rows = w.reshape(-1, K)
    out = torch.empty(rows.shape[0], fmt.row_bytes(K), dtype=torch.uint8, device=w.device)
    step = max(1, (1 << 18) // K)  # rows per chunk, so the temporaries stay in cache
    for i in range(0, rows.shape[0], step):
        chunk = rows[i:i + step]
        out[i:i + step] = _quantize_blocks(chunk.reshape(chunk.shape[0], K // QK, QK), fmt.name).reshape(chunk.shape[0], -1)
    return out.reshape(*lead, fmt.row_bytes(K))


def _quantize_blocks(b: torch.Tensor, name: str) -> torch.Tensor:
    """float32 [M, nb, 32] -> uint8 [M, nb, type_size] (q8_0 / q4_0 / q4_1)."""
    if name == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127
        q = _roundf(b * _inv(d)).to(torch.int8).view(torch.uint8)
        out = torch.cat([_f16_bytes(d), q], dim=-1)
    elif name == "q4_0":
        mx = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # signed value of the first largest |w|
        d = mx / -8
        q = torch.trunc(b * _inv(d) + 8.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_f16_bytes(d), q[..., :16] | (q[..., 16:] << 4)], dim=-1)
    else:  # q4_1
        mx = b.amax(-1, keepdim=True)
        mn = b.amin(-1, keepdim=True)
        d = (mx - mn) / 15
        q = torch.trunc((b - mn) * _inv(d) + 0.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_f16_bytes(d), _f16_bytes(mn), q[..., :16] | (q[..., 16:] << 4)], dim=-1)
    return out


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K] (K a multiple of 32) -> (q int8 [T, K], d float32 [T, K/32], s float32 [T, K/32]):
    the fused kernels' rounding of x, bit for bit: per block of 32, d = amax / 127, inv = 127 / amax
    (0 for an all-zero block), q = round-half-even(x * inv), s = d * sum(q)."""
    T, K = x.shape
    if K % QK:
        raise ValueError(f"activation length K={K} must be a multiple of {QK}")
    b = x.float().reshape(T, K // QK, QK)
    amax = b.abs().amax(-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv[..., None]).clamp(-127, 127)
    d = amax / 127
    s = d * q.sum(-1)
    return q.to(torch.int8).reshape(T, K), d, s


def int8_reference(x: torch.Tensor, w: torch.Tensor, qtype, K: int) -> torch.Tensor:
    """float64 [T, N]: the product the fused kernels compute, with x rounded as quantize_activations does
    and every sum in float64 (kernels differ from it by fp32 accumulation only). Float formats: x as is."""
    fmt = get_format(qtype)
    W = dequantize(w, fmt, K).double()
    x2 = x.reshape(-1, K)
    if fmt.quantized:
        q, d, _ = quantize_activations(x2)
        xh = (q.double().reshape(-1, K // QK, QK) * d.double()[..., None]).reshape(-1, K)
    else:
        xh = x2.double()
    return xh @ W.t()
