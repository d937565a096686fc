"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs, after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU) or peak allocated GPU memory, in MB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is kB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def header(title: str) -> None:
    print(f"\n== {title} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'})")


def cpu_info() -> dict[str, object]:
    """The CPU as ``lscpu`` names it ("Model name"), whether it has AVX-512 (timings differ ~3x
    between the two kinds) and AMX (bf16 matrix units, where bf16 autocast could pay) and the threads
    torch uses."""
    import subprocess
    from pathlib import Path

    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return {"model": model or "unknown CPU", "avx512": "avx512f" in flags, "amx": "amx_bf16" in flags,
            "threads": torch.get_num_threads()}


def describe_cpu(info: dict[str, object]) -> str:
    """One line for a report; AMX is named only where a result recorded it (older ones did not)."""
    amx = "" if "amx" not in info else f", AMX {'yes' if info['amx'] else 'no'}"
    return f"{info['model']}, AVX-512 {'yes' if info['avx512'] else 'no'}{amx}, torch on {info['threads']} threads"
