"""How benchmarks/benchmark.py measures: paired rounds with bootstrap intervals, device time over many graph replays on
inputs rotated beyond the cache, the machine's two ceilings, and peak memory.

- **Ratios from paired rounds.** Each round times A and B back to back, in a random order, and keeps their ratio: a
  machine that drifts between rounds (a shared host, a clock that changes) moves both sides of a round together. The
  median ratio is reported with a 95% bootstrap interval over the rounds.
- **Device time** of a small piece of work: captured once as a CUDA graph that runs it on each of several input sets
  (together several times the L2 cache, so that no replay finds its inputs cached), replayed many times between two
  CUDA events; divided by replays and input sets. On a CPU the same loop, timed by the host clock.
- **Floors**: the larger of bytes over the measured copy bandwidth and FLOPs over the measured matrix-product rate.
"""

import gc
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Interval:
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> Interval:
    """The median of `values` with the 2.5 and 97.5 percentiles of the medians of `resamples` resamples."""
    generator = random.Random(seed)
    medians = sorted(statistics.median(generator.choices(values, k=len(values))) for _ in range(resamples))
    return Interval(statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1])


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_seconds(function, device: torch.device) -> float:
    """Seconds from the call until its work is done on the device: what a user waits for (host time included)."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def paired_rounds(first, second, device: torch.device, rounds: int, warmup: int = 2, seed: int = 0) -> dict:
    """`rounds` rounds that each time `first` and `second` once, in a random order: each side's seconds per round and
    the interval of their ratio (`first / second`)."""
    generator = random.Random(seed)
    times = {"first": [], "second": []}
    gc.collect()
    gc.disable()  # as timeit does: a collection inside one side's timing would be charged to it alone
    try:
        for round_index in range(warmup + rounds):
            sides = [("first", first), ("second", second)]
            generator.shuffle(sides)
            for name, function in sides:
                seconds = wall_seconds(function, device)
                if round_index >= warmup:
                    times[name].append(seconds)
    finally:
        gc.enable()
    ratios = [a / b for a, b in zip(times["first"], times["second"])]
    return {"first_s": times["first"], "second_s": times["second"], "ratio": bootstrap_interval(ratios).__dict__}


def device_seconds(function, input_sets: list, device: torch.device, replays: int = 20) -> float:
    """Seconds of device work per call of `function(*inputs)`, over `input_sets` in turn: one CUDA graph of one call
    per set, replayed `replays` times between two events (on a CPU, the calls timed by the host clock)."""

    def all_sets():
        for inputs in input_sets:
            function(*inputs)

    if device.type != "cuda":  # a dry run of the method: a quarter of the calls
        replays = max(1, replays // 4)
        all_sets()
        start = time.perf_counter()
        for _ in range(replays):
            all_sets()
        return (time.perf_counter() - start) / (replays * len(input_sets))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            all_sets()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        all_sets()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * len(input_sets))


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets keep a replay from finding its inputs in the cache: together four times the L2, at least
    2, at most 64 (on a CPU, whose timings here are a dry run of the method, 2)."""
    if device.type != "cuda":
        return 2
    cache = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(64, -(-4 * cache // max(bytes_per_set, 1))))


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy, counting each byte read and written."""
    size = 2**30 if device.type == "cuda" else 2**26
    source = torch.empty(size, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    seconds = device_seconds(lambda: target.copy_(source), [()], device, replays=10)
    return 2 * size / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOPs per second of a large matrix product in `dtype`, on random data."""
    size = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = device_seconds(lambda: a @ b, [()], device, replays=10)
    return 2 * size**3 / seconds


@dataclass
class Ceilings:
    bandwidth: float  # bytes / s
    flops: float  # FLOP / s

    def floor_seconds(self, bytes_moved: float, flops: float) -> float:
        return max(bytes_moved / self.bandwidth, flops / self.flops)


def memory_mb(device: torch.device, peak: bool) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device) / 2**20
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:" if peak else "VmRSS:")[1].split()[0]) / 1024


def peak_memory_mb(model, function, device: torch.device) -> float:
    """The model's parameters and buffers plus how far memory rises above its level before `function` at the peak:
    on CUDA, allocated tensors; on CPU, the process's resident set (reset through `/proc/self/clear_refs`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
    before = memory_mb(device, peak=False)
    function()
    tensors = [*model.parameters(), *model.buffers()]
    return memory_mb(device, peak=True) - before + sum(t.numel() * t.element_size() for t in tensors) / 2**20
