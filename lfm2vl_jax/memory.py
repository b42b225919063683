"""What the host can hold: sizes a user controls are checked against it before anything is allocated."""

from __future__ import annotations

import os


def available_host_memory() -> int | None:
    """Bytes the host can still give a process without swapping (Linux `MemAvailable`; elsewhere the free
    pages), or None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.3g} GB"
