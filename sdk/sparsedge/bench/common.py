"""Timing helpers shared by the benchmarks: device-aware timers, copy bandwidth, environment facts."""
from __future__ import annotations

import os
import platform
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]


def time_fn(fn: Callable[[], object], device="cpu", warmup: int = 3, iters: int = 20,
            min_time: float = 0.0) -> float:
    """Median seconds per call of fn() (synchronising the device around each call)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    t_end = time.perf_counter() + min_time
    while len(samples) < iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * iters:
            break
    samples.sort()
    return samples[len(samples) // 2]


def copy_bandwidth(device="cpu", nbytes: int = 512 << 20) -> float:
    """Measured device-memory copy bandwidth in GB/s (bytes read + bytes written per second)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, iters=5)
    return 2 * nbytes / t / 1e9


def environment(device="cpu") -> dict:
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
           "machine": platform.machine(), "cpu_count": os.cpu_count()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
