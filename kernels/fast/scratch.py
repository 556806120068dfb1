"""Temporaries of the tuned CPU kernels: arrays that never leave a call, reused from call to call.

A fresh multi-megabyte NumPy array page-faults on first touch (the OS hands out zeroed pages),
which costs about as much as the matrix products of a 64x64, 32-channel layer. So each kernel
family keeps its temporaries in its own namespace (``Scratch("conv2d")``), one buffer per thread
and slot, grown to the largest size asked for. ``release()`` frees them for every thread;
``mc.config.scratch = "fresh"`` allocates each one anew instead (nothing is kept). A kernel's
results never live in these buffers (they are copied out).
"""
from __future__ import annotations

import math
import threading

import numpy as np

from kernels.config import settings

_lock = threading.Lock()
_buffers = {}        # (namespace, thread id, slot, dtype) -> 1-D array
_handed = {}         # the same keys -> how many times the slot was handed out


class Scratch:
    """The reused temporaries of one kernel family."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def get(self, slot: str, shape, dtype, zero=False):
        """An array of ``shape`` and ``dtype`` for this thread's ``slot``: undefined contents
        unless ``zero``; valid until this thread asks for the same slot again."""
        if settings.scratch == "fresh":
            return np.zeros(shape, dtype=dtype) if zero else np.empty(shape, dtype=dtype)
        size, key = math.prod(shape), self._key(slot, dtype)
        _handed[key] = _handed.get(key, 0) + 1
        buffer = _buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=dtype)
            with _lock:
                _buffers[key] = buffer
        out = buffer[:size].reshape(shape)
        if zero:
            out.fill(0)
        return out

    def stamp(self, slot: str, dtype):
        """A token for this thread's ``slot`` as last handed out (None when scratch is "fresh":
        nothing is shared then); ``unchanged(token)`` tells whether it is still that buffer."""
        if settings.scratch == "fresh":
            return None
        key = self._key(slot, dtype)
        return key, _handed.get(key)

    def release(self):
        """Free this family's temporaries, on every thread."""
        release(self.namespace)

    def _key(self, slot, dtype):
        return self.namespace, threading.get_ident(), slot, np.dtype(dtype)


def unchanged(token) -> bool:
    """Whether the slot of ``token`` (``Scratch.stamp``) was neither handed out again nor released
    since: its buffer still holds what was written into it."""
    if token is None:
        return True
    key, handed = token
    return handed is not None and _handed.get(key) == handed and key in _buffers


def release(namespace=None):
    """Free the temporaries of one kernel family (or of all of them), on every thread."""
    with _lock:
        for key in [k for k in _buffers if namespace is None or k[0] == namespace]:
            del _buffers[key]


def held_bytes(namespace=None) -> int:
    """Bytes held in temporaries (of one family, or all), over every thread."""
    with _lock:
        return sum(b.nbytes for k, b in _buffers.items() if namespace is None or k[0] == namespace)
