"""Handing freed memory back to the system (the edge's draft load, the worker's kernel swap)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from typing import Any


def libc() -> Any:
    """The process's C library (``ctypes``), with errno kept."""
    return ctypes.CDLL(None, use_errno=True)


def trim_heap() -> None:
    """Collect garbage and hand the free heap pages back to the system (glibc's ``malloc_trim``;
    nothing where the C library lacks it)."""
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):
        libc().malloc_trim(0)
