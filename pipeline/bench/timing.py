"""How a benchmark figure is taken: repeated calls timed, rounds reduced to medians."""

from __future__ import annotations

import time

import numpy as np


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.median([row[key] for row in rows])) for key in rows[0]}


def latency_stats(call, images: np.ndarray, batch: int, budget_s: float) -> dict[str, float]:
    """Time `call(batch_of_uint8)` repeatedly over the test images, end to end from arrays."""
    call(images[:batch])  # warm-up: first-call allocations and graph setup
    times, start, offset = [], time.perf_counter(), 0
    while time.perf_counter() - start < budget_s or len(times) < 5:
        chunk = images[offset : offset + batch]
        if len(chunk) < batch:
            offset, chunk = 0, images[:batch]
        tick = time.perf_counter()
        call(chunk)
        times.append(time.perf_counter() - tick)
        offset += batch
    times_ms = np.array(times) * 1000
    return {
        "images_per_s": batch * len(times) / (times_ms.sum() / 1000),
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        "calls": len(times),
    }
