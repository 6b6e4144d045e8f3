"""What the GPU benchmarks share: CUDA-event timing and the fused kernel's tuned tiles."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of `fn` on the GPU, in ms, each call between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fused_kernel_configs() -> dict[str, str]:
    """The tile configuration Triton's autotuner chose for each key the run met."""
    from patches.inject import experts_4bit_triton

    tuners = {"x@W^T": experts_4bit_triton._x_wt_tuned, "x@W": experts_4bit_triton._x_w_tuned}
    configs = {
        f"{name} N={key[0]} K={key[1]} rows/expert~{key[2]} lora_r={key[3]}": str(config)
        for name, tuner in tuners.items()
        for key, config in tuner.cache.items()
    }
    for key, config in experts_4bit_triton._low_rank_grad_tuned.cache.items():
        configs[f"lora grad N={key[0]} rows/expert~{key[1]} lora_r={key[2]}"] = str(config)
    return configs
