"""The decode kernels' thread pool (backends/cpu/threadpool.h) claims chunks instead of assigning them: when another
process holds a core, whichever thread runs takes the next chunk. The chunk boundaries never depend on who runs
them, so results are bit-identical with and without a competing process (docs/results/quant.md measures the speed
side)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sparsedge.backends import get_backend
from sparsedge.quant.qweight import QWeight

get_backend("cpu")
ops = torch.ops.sparsedge


def _calls():
    g = torch.Generator().manual_seed(0)
    w = QWeight.quantize(torch.randn(4096, 576, generator=g), "q4_1")
    x = torch.randn(1, 576, generator=g)
    wn = torch.ones(576)
    r = torch.randn(1, 576, generator=g)
    return [lambda: ops.qlinear(x, w.data, "q4_1", 576),
            lambda: ops.qlinear(torch.randn(40, 576, generator=torch.Generator().manual_seed(1)), w.data, "q4_1", 576),
            lambda: ops.add_rms_norm(r.clone(), x, wn, 1e-5)]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 threads to split work")
def test_results_do_not_depend_on_a_competing_process():
    calls = _calls()
    quiet = [[f() for _ in range(3)] for f in calls]
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = [[f() for _ in range(200)] for f in calls]
    finally:
        spin.kill()
        spin.wait()
    for q, b in zip(quiet, busy):
        assert all(torch.equal(q[0], y) for y in q + b)
