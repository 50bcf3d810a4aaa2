"""How many of this process's cores other processes leave free.

On a shared machine torch's default (one intra-op thread per core) is the
worst choice: OpenMP threads spin at every barrier waiting for a partner the
scheduler has parked behind another process's work. On two cores with one
taken by a busy loop, the command line's runs took 5-10x as long with two
threads as with one (bench/busy_machine.py). The command line therefore
sizes its thread pool from the cores found idle when it starts.
"""

from __future__ import annotations

import os
import time


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def free_cores(window: float = 0.2) -> int:
    """The usable cores minus those other processes kept busy over the
    next ``window`` seconds (rounded), at least 1. Reads the per-CPU time
    counters of /proc/stat; where there are none (not Linux), every usable
    core counts as free."""
    cores = usable_cores()
    first = _busy_seconds(cores)
    if first is None:
        return len(cores)
    own = _own_cpu_seconds()
    start = time.perf_counter()
    time.sleep(window)
    elapsed = time.perf_counter() - start
    second = _busy_seconds(cores)
    if second is None:
        return len(cores)
    others = max(0.0, (second - first) - (_own_cpu_seconds() - own)) / elapsed
    return max(1, len(cores) - int(others + 0.5))


def _busy_seconds(cores: list[int]) -> float | None:
    """CPU seconds spent not idle on ``cores`` since boot."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cores}
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy, seen = 0, 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            busy += sum(values) - values[3] - values[4]
            seen += 1
    return busy / ticks if seen else None


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
