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


def interleaved_wall_times_ms(fns, device, reps=20):
    """Sorted per-call wall times in ms of each of `fns`, timed in rounds (one call of each fn
    per round, the device synchronised after every call), so that a machine that drifts (a busy
    neighbour, clocks, the allocator growing) slows every fn alike instead of the ones that
    happen to run at the wrong moment. Warm the fns up before."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(1000 * (time.perf_counter() - t0))
    return [sorted(t) for t in times]


def quantiles(times):
    """[median, p20, p80] of sorted times."""
    return [statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]]
