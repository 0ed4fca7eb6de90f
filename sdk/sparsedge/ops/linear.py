"""Dense projections of the decode path, as ops so each backend can stream the weights its own way.

  linear(x [.., K], w [N, K], bias [N]?) -> [.., N]     y = x w^T + bias
  linear_t(x [.., K], w_t [K, N])        -> [.., N]     y = x w_t   (W_down is stored transposed, [I, d])
Fused CPU kernels take the decode case (<= 8 tokens) and leave larger batches to torch's GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsedge.ops.schema import FLOAT_DTYPES, define, rows, sweep


def linear_ref(x, w, bias=None):
    return F.linear(x, w, bias)


def linear_t_ref(x, w_t):
    return torch.matmul(x, w_t)


define("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor", linear_ref,
       lambda x, w, bias=None: x.new_empty(*x.shape[:-1], w.shape[0]))
define("linear_t(Tensor x, Tensor w_t) -> Tensor", linear_t_ref,
       lambda x, w_t: x.new_empty(*x.shape[:-1], w_t.shape[1]))

# parity cases (tests/test_ops.py): decode (T <= 8, the fused CPU path) and a batch past it, odd K / N, with and
# without bias
CASES = [
    *sweep("linear", FLOAT_DTYPES, at=rows("T K N bias", (1, 576, 960, True), (3, 37, 70, False), (8, 64, 5, True),
                                            (9, 576, 960, False))),
    *sweep("linear_t", FLOAT_DTYPES, at=rows("T K N", (1, 576, 960), (8, 37, 70), (9, 64, 5))),
]
