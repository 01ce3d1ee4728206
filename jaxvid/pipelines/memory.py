"""How much device memory a run took: XLA's peak, for `last_timings` and the CLI's summary line.

    peak_memory_bytes()        the largest peak_bytes_in_use over the local devices, or None
    peak_memory_gib()          the same in GiB (2**30 bytes), or None
    describe_peak()            "peak device memory 12.3 GiB (cuda:0)" or None

XLA counts the peak from the start of the process and has no reset, so the number covers
everything the process did so far (loading included); to measure one configuration, run it in
a fresh process (bench/e2e.py does). Backends whose devices report no memory statistics (jax's
CPU backend) give None, and callers print nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["GIB", "describe_peak", "peak_memory_bytes", "peak_memory_gib"]

GIB = 1 << 30


def _peaks(devices: Sequence[Any] | None) -> dict[Any, int]:
    out = {}
    for device in jax.local_devices() if devices is None else devices:
        try:
            stats = device.memory_stats()
        except (AttributeError, NotImplementedError, RuntimeError):  # backends without statistics
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            out[device] = int(stats["peak_bytes_in_use"])
    return out


def peak_memory_bytes(devices: Sequence[Any] | None = None) -> int | None:
    """The largest `peak_bytes_in_use` among `devices` (default: this process's local devices),
    since the process started; None when no device reports it."""
    peaks = _peaks(devices)
    return max(peaks.values()) if peaks else None


def peak_memory_gib(devices: Sequence[Any] | None = None) -> float | None:
    """`peak_memory_bytes` in GiB, or None."""
    peak = peak_memory_bytes(devices)
    return None if peak is None else peak / GIB


def describe_peak(devices: Sequence[Any] | None = None) -> str | None:
    """One phrase for a summary line, naming the device with the largest peak; None without statistics."""
    peaks = _peaks(devices)
    if not peaks:
        return None
    device, peak = max(peaks.items(), key=lambda kv: kv[1])
    where = str(device) if len(peaks) == 1 else f"{device}, the largest of {len(peaks)} devices"
    return f"peak device memory {peak / GIB:.2f} GiB ({where}; XLA's peak_bytes_in_use since the process started)"
