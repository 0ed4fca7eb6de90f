"""FFN activations: the one list of names every layer of the stack accepts, and their definition.

h = act(gate) * up, except drelu (relu on both gate and up) and relu2 (relu(gate)^2 * up). The C++
bindings (CPU, CUDA, AscendC) parse the same names through backends/include/sparsedge/activations.h, whose
order must match ACTIVATIONS (tests/test_ops.py checks it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "fatrelu", "drelu", "relu2")
# Activations whose zeros are exact: the home of the SVD predictors (a neuron predicted off is off).
RELU_FAMILY = ("relu", "fatrelu", "drelu", "relu2")


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown FFN activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return name


def activate(g: torch.Tensor, u: torch.Tensor, activation: str, act_param: float, tau: float) -> torch.Tensor:
    """h = act(g) * u with the conventions above (fp32 in, fp32 out)."""
    if activation == "silu":
        a = F.silu(g)
    elif activation == "gelu":
        a = F.gelu(g)
    elif activation == "gelu_tanh":
        a = F.gelu(g, approximate="tanh")
    elif activation in ("relu", "drelu"):
        a = torch.relu(g)
    elif activation == "fatrelu":
        a = torch.where(g > act_param, g, torch.zeros_like(g))
    elif activation == "relu2":
        a = torch.relu(g).square()
    else:
        raise ValueError(f"unknown FFN activation {activation!r} (supported: {', '.join(ACTIVATIONS)})")
    if activation == "drelu":
        u = torch.relu(u)
    h = a * u
    if tau > 0:
        h = torch.where(a.abs() < tau, torch.zeros_like(h), h)
    return h
