"""Timing helpers: interleaved repeats, medians, ratios against a baseline in the same process."""

from __future__ import annotations

import gc
import statistics
import time


def interleaved(fns: dict, repeats: int = 7, inner: int = 10, warmup: int = 3) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds (round r runs
    every function ``inner`` times), so that drifts of the machine hit all of them alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples = {k: [] for k in fns}
    gc.disable()
    try:
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    f()
                samples[k].append((time.perf_counter() - t0) / inner)
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}
