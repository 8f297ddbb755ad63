"""Microseconds per call of a kernel-sized function, timed the way a decode step runs it: `calls` calls captured in
one CUDA graph (no launch gaps), median over replays. Off the GPU (smoke runs): wall time, no graph."""

from __future__ import annotations

import statistics
import time

import torch

REPLAYS = 20


def per_call_us(fn, calls: int, device: str) -> float:
    """Median microseconds per call of fn(i) for i in range(calls) (each call its own inputs, e.g. a layer's own
    weights or cache, so nothing is served from L2)."""
    if device != "cuda":
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        return (time.perf_counter() - t) / calls * 1e6
    for i in range(calls):  # compiles (and autotunes) outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)
