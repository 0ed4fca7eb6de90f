"""GPU end to end: the Session on the cuda backend decodes the same greedy tokens as on CPU (fp32). Marked `gpu` and
`slow`; skipped, with the reason, without a GPU. The per-op CUDA parity is in tests/test_ops.py."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
if not torch.cuda.is_available():
    pytestmark.append(pytest.mark.skip(reason="no CUDA GPU visible (torch.cuda.is_available() is False)"))


def test_session_greedy_tokens_match_cpu():
    from sparsedge import Session

    prompt = "The capital of France is"
    try:
        cpu = Session.load("smollm2-135m", backend="cpu", dtype=torch.float32)
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"smollm2-135m not available: {exc}")
    gpu = Session.load("smollm2-135m", backend="cuda", dtype=torch.float32)
    a = cpu.generate(prompt, max_new_tokens=32).token_ids
    b = gpu.generate(prompt, max_new_tokens=32).token_ids
    assert list(b) == list(a), f"cuda greedy tokens diverge from cpu:\n cpu {list(a)}\ncuda {list(b)}"
