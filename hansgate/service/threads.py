"""Names the operating system shows for the gateway's threads (``top -H``, ``/proc/PID/task/*/comm``).

Python 3.11 names its threads only inside Python; the kernel sees every one of them as
``python``. Naming the OS thread lets an operator (and ``benchmarks/service_bench.py``) tell
the inference thread's CPU time from the event loop's and the decode pool's.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["name_os_thread"]

_PR_SET_NAME = 15  # linux/prctl.h
_MAX_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one NUL


def name_os_thread(name: str) -> bool:
    """Give the calling thread ``name`` (ASCII, cut to 15 bytes) in the kernel; ``False`` where the
    platform has no ``prctl`` (it is only a label: nothing depends on it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_NAME, name.encode("ascii", "replace")[:_MAX_NAME_BYTES], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
