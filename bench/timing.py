"""Wall-clock timing shared by the benchmarks: warm up, then time each call with the device
synchronised, and report quantiles."""
import statistics
import time

import torch


def wall_times_ms(fn, device, warmup=2, reps=20):
    """Sorted per-call wall times in ms (the device synchronised after every call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)


def quantiles(times):
    """[median, p20, p80] of sorted times."""
    return [statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]]
