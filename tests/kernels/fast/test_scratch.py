"""kernels.fast.scratch: temporaries per kernel family and thread, released from any thread,
or fresh arrays when mc.config.scratch says so."""
import threading

import numpy as np

from kernels.config import settings
from kernels.fast import scratch


def test_a_slot_is_reused_and_grows(rng):
    s = scratch.Scratch("test-reuse")
    try:
        a = s.get("slot", (4, 5), np.float64)
        a[...] = 1
        b = s.get("slot", (2, 3), np.float64)               # smaller: the same memory
        assert np.shares_memory(a, b)
        c = s.get("slot", (10, 10), np.float64)              # larger: a new, bigger buffer
        assert not np.shares_memory(a, c) and c.shape == (10, 10)
        assert s.get("slot", (3,), np.float64, zero=True).tolist() == [0.0, 0.0, 0.0]
        assert not np.shares_memory(s.get("slot", (3,), np.float32), c)   # per dtype
    finally:
        s.release()


def test_families_and_threads_have_their_own_buffers():
    one, two = scratch.Scratch("test-one"), scratch.Scratch("test-two")
    try:
        here = one.get("slot", (8,), np.float64)
        assert not np.shares_memory(here, two.get("slot", (8,), np.float64))
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(one.get("slot", (8,),
                                                                          np.float64)))
        thread.start()
        thread.join()
        assert not np.shares_memory(here, elsewhere[0])
        assert scratch.held_bytes("test-one") == 2 * 8 * 8
    finally:
        one.release()
        two.release()


def test_release_frees_every_thread_of_a_family():
    family = scratch.Scratch("test-release")
    other = scratch.Scratch("test-kept")
    try:
        thread = threading.Thread(target=lambda: family.get("slot", (1000,), np.float64))
        thread.start()
        thread.join()
        family.get("slot", (1000,), np.float64)
        other.get("slot", (10,), np.float64)
        assert scratch.held_bytes("test-release") == 2 * 8000
        family.release()                                     # from this thread: both go
        assert scratch.held_bytes("test-release") == 0
        assert scratch.held_bytes("test-kept") == 80         # another family is kept
    finally:
        other.release()


def test_fresh_policy_keeps_nothing():
    family = scratch.Scratch("test-fresh")
    with settings.override(scratch="fresh"):
        a = family.get("slot", (5,), np.float64)
        b = family.get("slot", (5,), np.float64, zero=True)
        assert not np.shares_memory(a, b) and not b.any()
        assert scratch.held_bytes("test-fresh") == 0
