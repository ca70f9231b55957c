"""Allocator settings for a client process that sends and receives large tensors (glibc).

Every call with a tensor of a few hundred KiB allocates several blocks of its size (the bytes
of the request, the protobuf copies, the answer's array) and frees them at the end. glibc
returns the free top of its heap to the OS once it exceeds its trim threshold (twice the
largest block freed so far, by default) and maps large blocks afresh, so the next call pays for
page faults and zeroing of new pages: measured here, a Forward of a (100, 784) float32 tensor
spent more than half its round trip on it (bench/python_client.py). Raising both thresholds
lets freed blocks be reused; the process keeps what it freed, up to its peak use.

This is process-wide, so it is a call the application makes (like the server, which applies
the same settings at start), not a side effect of importing layerd.
"""
import ctypes
import ctypes.util
import os
import sys

#: Blocks up to this size come from the heap (reused), not their own mapping (as the server's).
MMAP_THRESHOLD = 64 << 20
#: Free memory at the heap's top beyond this goes back to the OS (as the server's).
TRIM_THRESHOLD = 256 << 20

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> dict:
    """Raises glibc's mmap and trim thresholds for this process (see the module doc); a setting
    given in the environment (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) is left alone.
    Answers what was set, by environment-variable name ({} off Linux/glibc). Call it once, early;
    it is harmless to call again."""
    if not sys.platform.startswith("linux"):
        return {}
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl has no mallopt: nothing to tune
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for variable, parameter, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                       ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if variable not in os.environ and mallopt(parameter, value) == 1:
            applied[variable] = value
    return applied
