"""How a worker's C allocator treats request-sized buffers (glibc).

glibc serves an allocation above its mmap threshold (adaptive, at most 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``. A request body at 224 px is tens of MiB (the socket's
chunks joined into one buffer, which the model then reads in place), so every request
mapped new pages that the kernel zero-filled one page fault at a time, and returned them
when the reply left: system time the event loop paid per request, beside the copy itself
(``benchmarks/gateway_model_bench.py`` splits a request's CPU by thread). Raising the mmap
threshold to the largest body the gateway accepts, and the trim threshold above it, serves
such buffers from the heap and keeps freed ones there for the next request.

The price is memory a worker keeps after a burst: up to about its largest concurrent bodies,
bounded by ``HANSGATE_MAX_BODY_BYTES`` times the bodies it reads at once. ``HANSGATE_REUSE_BUFFERS=0``
leaves glibc's defaults; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["reuse_large_buffers"]

log = logging.getLogger("hansgate.service")

_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3


def reuse_large_buffers(largest: int) -> bool:
    """Serve allocations up to ``largest`` bytes from the heap and keep freed heap memory up to twice
    that (module doc); ``False`` (nothing changed) where the C library is not glibc."""
    if largest < 1 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    limit = min(largest, 2**30)  # mallopt takes an int; a larger body falls back to mmap as before
    if not (mallopt(_M_MMAP_THRESHOLD, limit) and mallopt(_M_TRIM_THRESHOLD, min(2 * limit, 2**31 - 1))):
        log.warning("glibc refused mallopt for %d bytes; request buffers stay memory-mapped", limit)
        return False
    return True
