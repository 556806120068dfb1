"""Stand-ins for the distributed tests: ranks as threads of one process, and NCCL / CuPy fakes
that record what the NCCL communicator asks of them (no GPU needed)."""
from __future__ import annotations

import os
import threading
import types

import numpy as np

from minicnn.distributed import Communicator


class ThreadGroup:
    """``size`` ranks as threads; each collective meets at a barrier, reads every rank's array,
    and reduces them in rank order (so the result is the same on every rank)."""

    def __init__(self, size, timeout=60):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size

    def exchange(self, rank, array):
        self.slots[rank] = np.array(array, copy=True)
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()                     # all have read before the slots are reused
        return parts


class ThreadCommunicator(Communicator):
    backend = "threads"

    def __init__(self, group: ThreadGroup, rank: int):
        super().__init__()
        self.group, self.rank, self.size = group, rank, group.size

    def _allreduce(self, array, op):
        parts = self.group.exchange(self.rank, array)
        if op in ("sum", "mean"):
            total = parts[0].copy()
            for part in parts[1:]:
                total += part
            if op == "mean":
                total /= self.size
        else:
            total = (np.maximum if op == "max" else np.minimum).reduce(parts)
        array[...] = total
        return array

    def _broadcast(self, array, root):
        array[...] = self.group.exchange(self.rank, array)[root]
        return array

    def barrier(self):
        self.group.barrier.wait()

    def local_rank(self):
        return self.rank


def run_ranks(size, fn):
    """[fn(comm) for each rank], run in ``size`` threads; the first error is raised again."""
    group = ThreadGroup(size)
    comms = [ThreadCommunicator(group, r) for r in range(size)]
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = fn(comms[rank])
        except BaseException as error:        # noqa: BLE001  (re-raised below)
            errors.append(error)
            group.barrier.abort()              # free the other ranks
    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# -- NCCL and CuPy stand-ins ----------------------------------------------------------------------

def fake_nccl(unique_id=None):
    """A module-like object with NCCL's constants, get_unique_id and NcclCommunicator; every
    call is appended to ``module.calls``."""
    calls = []

    class NcclCommunicator:
        def __init__(self, ndev, commId, rank):  # noqa: N803  (NCCL's names)
            self.ndev, self.commId, self.rank = ndev, commId, rank
            calls.append(("init", ndev, commId, rank))

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802
            calls.append(("allReduce", sendbuf, recvbuf, count, datatype, op, stream))

        def bcast(self, buff, count, datatype, root, stream):
            calls.append(("bcast", buff, count, datatype, root, stream))

    def get_unique_id():
        value = os.urandom(128) if unique_id is None else unique_id
        calls.append(("get_unique_id", value))
        return value

    names = ["NCCL_INT8", "NCCL_UINT8", "NCCL_INT32", "NCCL_UINT32", "NCCL_INT64",
             "NCCL_UINT64", "NCCL_FLOAT16", "NCCL_FLOAT32", "NCCL_FLOAT64"]
    module = types.SimpleNamespace(calls=calls, NcclCommunicator=NcclCommunicator,
                                   get_unique_id=get_unique_id, NCCL_SUM=0, NCCL_PROD=1,
                                   NCCL_MAX=2, NCCL_MIN=3,
                                   **{name: 10 + i for i, name in enumerate(names)})
    return module


def fake_cupy(devices=4, stream_pointer=77):
    """CuPy's device and stream calls NCCLCommunicator makes; ``module.used`` lists the devices
    made current, ``module.synchronized`` counts stream synchronisations."""
    module = types.SimpleNamespace(used=[], synchronized=[0])

    class Device:
        def __init__(self, index):
            self.index = index

        def use(self):
            module.used.append(self.index)

    class Stream:
        ptr = stream_pointer

        def synchronize(self):
            module.synchronized[0] += 1

    module.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: devices),
        Device=Device, get_current_stream=lambda: Stream())
    return module


class FakeDeviceArray:
    """A NumPy array dressed as a CuPy one (``is_gpu_array`` is true: its module is 'cupy...')
    with ``.data.ptr``, for the device path of NCCLCommunicator."""

    __module__ = "cupy_fake"

    def __init__(self, values):
        self.values = np.ascontiguousarray(values)
        self.data = types.SimpleNamespace(ptr=self.values.ctypes.data)
        self.flags, self.dtype = self.values.flags, self.values.dtype
        self.size, self.nbytes, self.shape = self.values.size, self.values.nbytes, \
            self.values.shape

    def __itruediv__(self, other):
        self.values /= other
        return self
