"""Random GGUF block weights for the qlinear parity cases (sparsedge.ops.quant.CASES) and the format tests."""
from __future__ import annotations

import torch

from sparsedge.quant import formats as qf


def random_blocks(qtype, N: int, K: int, gen: torch.Generator | None = None, scale: float = 0.02) -> torch.Tensor:
    """uint8 [N, row_bytes] of valid, finite blocks: random quant bytes with fp16 scale fields in
    (0, scale] (q4_k's dmin too, q6_k's int8 sub-scales anything; tq2_0's 2-bit codes 0..3, 3 included). The float
    formats get N(0, 1) values."""
    fmt = qf.get_format(qtype)
    if not fmt.quantized:
        return qf.quantize(torch.randn(N, K, generator=gen), fmt)
    nb = K // fmt.block
    raw = torch.randint(0, 256, (N, nb, fmt.type_size), dtype=torch.uint8, generator=gen)

    def half(n_fields: int) -> torch.Tensor:
        return (torch.rand(N, nb, n_fields, generator=gen) * scale).half().view(torch.uint8)

    if fmt.name in ("q8_0", "q4_0"):
        raw[..., 0:2] = half(1)
    elif fmt.name in ("q4_1", "q4_k"):  # d and m / dmin; q4_1's m is a signed offset
        f = torch.rand(N, nb, 2, generator=gen) * scale
        if fmt.name == "q4_1":
            f[..., 1] = -8 * f[..., 1]
        raw[..., 0:4] = f.half().view(torch.uint8)
    elif fmt.name == "tq2_0":  # d at the end
        raw[..., 64:66] = half(1)
    else:  # q6_k: d at the end
        raw[..., 208:210] = (torch.rand(N, nb, 1, generator=gen) * scale / 64).half().view(torch.uint8)
    return raw.reshape(N, nb * fmt.type_size)


def case_inputs(case, seed: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x [T, K] in case.dtype, w uint8 [N, row_bytes]) for a sparsedge.ops.quant.QCase. The 32-block
    formats quantize Gaussian weights (what a converted checkpoint holds); the K-quants get random blocks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.T, case.K, generator=gen)
    x[:, : min(32, case.K)] *= 8  # one block of larger activations (a different scale per block)
    if case.qtype in ("q8_0", "q4_0", "q4_1"):
        w = qf.quantize(torch.randn(case.N, case.K, generator=gen) / case.K ** 0.5, case.qtype)
    else:
        w = random_blocks(case.qtype, case.N, case.K, gen)
    return x.to(case.dtype).to(device), w.to(device)
