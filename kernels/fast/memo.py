"""Buffer sharing between calls of the tuned kernels, hidden from their callers.

minicnn's Functions ask for one gradient per call (``conv2d_transpose`` for dx,
``conv2d_backward_filter`` for dw, ``bias_gradient`` for db), but some calls derive from an input
array what a later call on the same array reads again: the forward convolution's padded input or
window matrix (the filter gradient's operand), the input gradient's zero-bordered dy (the filter
gradient's dy grid), the filter gradient's sums of dy (the bias gradient). A ``Memo`` keeps such a
value keyed on the array object and on what was derived (with its geometry); the later call takes
it, once.

An entry lives until it is taken or the array is garbage-collected (a weak reference), so nothing
outlives the arrays it came from. It assumes the array is not written in between: minicnn's
Functions never write their inputs or gradients; a caller that does should call ``forget``.
"""
from __future__ import annotations

import threading
import weakref


class Memo:
    """Values derived from arrays, each taken at most once (see the module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries = {}         # (id(array), what) -> (weak reference to the array, value)

    def put(self, array, what, value):
        """Keep ``value``, derived from ``array`` as ``what`` (hashable), for a later ``take``."""
        key = (id(array), what)
        ref = weakref.ref(array, lambda dead, key=key: self._drop(key, dead))
        with self._lock:
            self._entries[key] = (ref, value)

    def take(self, array, what):
        """The value kept for ``array`` as ``what`` (removed), or None."""
        with self._lock:
            entry = self._entries.pop((id(array), what), None)
        return entry[1] if entry is not None and entry[0]() is array else None

    def forget(self, array=None):
        """Drop what is kept for ``array`` (for every array when None)."""
        with self._lock:
            for key in [k for k in self._entries if array is None or k[0] == id(array)]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key, dead_ref):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is dead_ref:
                del self._entries[key]
