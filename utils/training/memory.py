"""Peak memory of a run: the process's peak resident memory (RSS) on a CPU, and on a GPU also
what PyTorch's allocator handed out and kept (`torch.cuda.max_memory_allocated` and
`max_memory_reserved`). Recorded per epoch in metrics.csv, at the end in config.json and printed.

The process peak is the kernel's (VmHWM in /proc/self/status on Linux, `getrusage` elsewhere).
`reset_peak` starts a new measurement, so that runs in one process (the trials of a sweep) each
get their own peak; where the kernel cannot reset it (not Linux), the peak is the process's.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

MB = 2 ** 20
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def process_peak_mb() -> float:
    """The process's peak resident memory in MB since it started, or since `reset_peak`."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB            # reported in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # kB on Linux, bytes on macOS
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def reset_peak(device: torch.device) -> None:
    """Start a new peak measurement: the kernel's peak RSS (Linux: writing 5 to clear_refs) and
    the CUDA allocator's peaks."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """{'peak_rss_mb': ...} on a CPU; on a GPU also 'cuda_max_allocated_mb' and 'cuda_max_reserved_mb'."""
    peaks = {"peak_rss_mb": round(process_peak_mb(), 1)}
    if device.type == "cuda":
        peaks["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / MB, 1)
        peaks["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / MB, 1)
    return peaks


def describe_peak(peaks: dict[str, float]) -> str:
    """'peak memory 868 MB (RSS)', plus the GPU's allocated and reserved peaks."""
    text = f"peak memory {peaks['peak_rss_mb']:.0f} MB (RSS)"
    if "cuda_max_allocated_mb" in peaks:
        text += (f", GPU {peaks['cuda_max_allocated_mb']:.0f} MB allocated, "
                 f"{peaks['cuda_max_reserved_mb']:.0f} MB reserved")
    return text


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure: CUDA's out of memory, a CPU allocation that
    failed (PyTorch's DefaultCPUAllocator, oneDNN), or Python's MemoryError."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):     # torch.OutOfMemoryError too
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                                or "not enough memory" in text)
