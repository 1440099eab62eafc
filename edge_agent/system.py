"""What the device is and how it is doing: RSS, CPU %, temperature, board model, throttling.

Reads /proc and /sys directly (no psutil on the device). Every reader returns None where the
information does not exist (containers, x86 laptops) instead of failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import resource
import shutil
import subprocess
import time
from typing import Any, Dict, Optional

THERMAL = "/sys/class/thermal/thermal_zone0/temp"


def rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_LIBC: Any = None

# glibc's mallopt() parameters (malloc.h) and the agent's smallest mmap threshold.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 1 << 20
ARENA_MAX = 2
MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
_threshold = 0  # the fixed mmap threshold in force; 0: glibc's own (dynamic) one


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.mallopt.argtypes, _LIBC.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _LIBC.malloc_trim.argtypes, _LIBC.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def tune_allocator() -> Optional[str]:
    """Make a long-running agent's RSS a function of what it holds (call before threads start).

    glibc raises its mmap threshold to the largest block ever freed, so after the first dropped
    model the next model's blocks are carved from the heap, where per-frame blocks allocated after
    them keep them resident (the soak's RSS levels wandered over 16 MB with remote commands). A
    fixed threshold maps every block above the per-frame buffers (:func:`fit_mmap_threshold`) and
    gives it back when freed; two arenas instead of eight per core share what the threads free.
    Left to the user when a glibc malloc variable is set. Returns what was done, None without glibc.
    """
    if any(name in os.environ for name in MALLOC_ENV):
        return "left to the environment"
    if not _set_threshold(MMAP_THRESHOLD):
        return None
    arenas = _libc().mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    return f"mmap threshold {MMAP_THRESHOLD >> 10} KiB" + (f", {ARENA_MAX} arenas" if arenas else "")


def fit_mmap_threshold(frame_bytes: int) -> Optional[int]:
    """Raise the tuned mmap threshold to the next power of two above a frame of ``frame_bytes``
    (its mask and overlay are no larger), so per-frame buffers are reused from the heap: a mapping
    per frame costs a page fault per 4 kB (+2.8 ms CPU per 1080p frame, measured). Never lowered,
    so a folder of mixed sizes does not flap. The new threshold when raised, else None; a no-op
    unless :func:`tune_allocator` set one."""
    want = 1 << int(frame_bytes).bit_length()  # the next power of two above it
    return want if _threshold and want > _threshold and _set_threshold(want) else None


def _set_threshold(size: int) -> bool:
    """Fixed mmap threshold ``size``, and a heap top kept up to twice that (what glibc's dynamic
    mode pairs with it) so a freed frame at the top is reused, not returned and faulted in again."""
    global _threshold
    libc = _libc()
    if not (libc and libc.mallopt(M_MMAP_THRESHOLD, size) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 * size) == 1):
        return False
    _threshold = size
    return True


def release_memory() -> bool:
    """Give the heap freed by a dropped interpreter back to the system (``gc`` + glibc's
    ``malloc_trim(0)``); True when it was trimmed.

    A benchmark's second interpreter or a swapped-out model frees tens of MB in glibc arenas that
    stay resident while a live block sits above them (RSS after the same drop lands anywhere in a
    ~15 MB band); called after each remote benchmark and deployment. A no-op without glibc (musl).
    """
    gc.collect()
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))


def cpu_temp_c(path: str = THERMAL) -> Optional[float]:
    try:
        with open(path) as fh:
            return int(fh.read().strip()) / 1000.0
    except (OSError, ValueError):
        return None


def board_model() -> str:
    """Raspberry Pi style model string, else the CPU model, else the machine type."""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            with open(path, "rb") as fh:
                text = fh.read().rstrip(b"\0").decode(errors="replace").strip()
                if text:
                    return text
        except OSError:
            pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("Model", "model name", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.machine()


def throttled() -> Optional[Dict[str, Any]]:
    """Raspberry Pi throttling flags from ``vcgencmd get_throttled`` (None where absent)."""
    exe = shutil.which("vcgencmd")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=2).stdout
        value = int(out.strip().split("=")[1], 16)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None
    return {
        "raw": hex(value),
        "under_voltage": bool(value & 0x1),
        "freq_capped": bool(value & 0x2),
        "throttled": bool(value & 0x4),
        "soft_temp_limit": bool(value & 0x8),
        "under_voltage_occurred": bool(value & 0x10000),
        "throttling_occurred": bool(value & 0x40000),
    }


def host_info() -> Dict[str, Any]:
    return {
        "machine": platform.machine(),
        "board": board_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }


class CpuMeter:
    """Process CPU % (of one core) between successive calls."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), self._cpu())

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def percent(self) -> float:
        now, cpu = time.monotonic(), self._cpu()
        wall = now - self._last[0]
        used = cpu - self._last[1]
        self._last = (now, cpu)
        return 100.0 * used / wall if wall > 0 else 0.0
