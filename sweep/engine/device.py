"""The device a worker runs on: its name, errors that poison it, freeing its memory, and batch sizes that fit."""
from __future__ import annotations

import gc
from typing import Protocol

import torch


def device_name(device: torch.device) -> str:
    """``"cpu"``, or the GPU's name (e.g. ``NVIDIA H100 80GB HBM3``): part of every setup."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


STICKY_ERRORS = ("device-side assert", "illegal memory access", "unspecified launch failure",
                 "misaligned address", "CUDA error: an illegal instruction", "uncorrectable ECC error")
"""CUDA errors after which the process's CUDA context is unusable: only a new process recovers."""


def is_sticky_error(exc: BaseException) -> bool:
    """A sticky CUDA error (see ``STICKY_ERRORS``): the worker process must be replaced."""
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in STICKY_ERRORS)


def is_device_error(exc: BaseException) -> bool:
    """A runtime error of the device itself (a sticky one, or any CUDA error), which eager would hit too."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or is_sticky_error(exc) or "CUDA error" in str(exc)



def free_memory(device: torch.device) -> None:
    """Return freed GPU memory to the device. Collect first: a compiled head holds its module in a reference
    cycle (torch.compile keeps the bound method), which only the cycle collector frees."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def retry_batch_sizes(batch_size: int) -> list[int]:
    """The configured batch size, then half of it once (when that is smaller): an out-of-memory batch's retry."""
    return [batch_size] + ([batch_size // 2] if batch_size > 1 else [])


class MemoryProbe(Protocol):
    """Where the automatic batch size reads device memory: the only GPU-specific part of that choice, so tests can
    run the choice (and its out-of-memory retries) on CPU against a simulated budget."""

    def free_bytes(self) -> int:
        """Memory the device can still allocate."""

    def start_peak(self) -> int:
        """Wait for queued work, reset the peak counter, and return the bytes allocated now (the resident ones)."""

    def peak_bytes(self) -> int:
        """Highest allocation since :meth:`start_peak`, after waiting for queued work."""


class CudaMemory:
    """:class:`MemoryProbe` of a CUDA device (``torch.cuda`` memory statistics)."""

    def __init__(self, device: torch.device):
        self.device = device

    def free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def start_peak(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def memory_probe(device: torch.device) -> MemoryProbe | None:
    """The memory probe of ``device``: CUDA's, or None where the batch size is not chosen from memory (CPU)."""
    return CudaMemory(device) if device.type == "cuda" else None


MEMORY_HEADROOM = 0.85
"""Fraction of free GPU memory a batch may plan to use (the allocator fragments; other tenants grow)."""
MAX_AUTO_BATCH = 64
"""Upper bound of an automatic batch: beyond it GPUs gain little and a failure loses more work."""


def batch_size_for(free_bytes: int, per_window_bytes: int, n_windows: int, cap: int = MAX_AUTO_BATCH) -> int:
    """Largest batch of windows whose planned memory fits in ``MEMORY_HEADROOM`` of the free memory.

    ``per_window_bytes`` is what one window costs at peak: its transient activations (measured) plus its share of
    the trie cache, (depth + 1) x T x H residual streams. Example: 40 GiB free, 1.5 GiB per window, 62 windows
    -> floor(0.85 * 40 / 1.5) = 22. Never below 1 (an OOM then becomes a failed row, not a crash), never above
    ``cap`` or the number of windows.
    """
    if per_window_bytes <= 0:
        return max(1, min(cap, n_windows))
    fits = int(MEMORY_HEADROOM * free_bytes // per_window_bytes)
    return max(1, min(fits, cap, max(n_windows, 1)))
