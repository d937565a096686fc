"""The machine a measurement ran on, for reports that quote timings."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_description() -> str:
    """The CPU model and whether it has AVX-512 (timings differ ~3x between the two kinds)."""
    model, avx512 = platform.processor() or "unknown CPU", False
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                     model)
        avx512 = "avx512f" in text
    except OSError:
        pass
    return f"{model}, {'with' if avx512 else 'without'} AVX-512"
