"""Data-parallel training: every rank holds the whole model and takes its share of each batch;
the ranks average their gradients before each step, so they all hold the same weights.

    comm = mc.distributed.init()             # "auto": NCCL between GPU ranks, MPI between CPU
                                             #   ranks, a 1-rank no-op outside mpiexec
    mc.distributed.seed(0, comm)             # rank 0 keeps seed 0, the others derive their own
    model.compile(optimizer=mc.distributed.DistributedOptimizer(mc.optimizers.Adam(1e-3), comm),
                  loss=..., metrics=[...])
    model.fit(x, y, batch_size=16)           # each of N ranks trains on 16 / N of every batch

    mpiexec -n 2 python train.py

One step on N ranks, rank r holding the share x_r (B / N samples) of the global batch:
    g_r = d loss(x_r) / d w                  (its own backward; the loss a mean over x_r)
    g   = (1 / N) sum_r g_r                  (allreduce, in a few large flat buckets)
    w  <- optimizer(w, g)                    (the same update on every rank)
With equal shares and a loss that is a mean over samples, g is the gradient of the loss over the
global batch: N ranks with batch B / N train as one process with batch B, exactly so when batch
normalisation takes its statistics over the global batch (``BatchNormalization(synchronized=
True)``, Keras 3's name). Otherwise each rank normalises by its own share (its moving statistics
are then averaged over the ranks after each step, so those agree too).

Engines: MPI through mpi4py (``pip install "minicnn[mpi]"`` brings mpi4py and Open MPI, no system
MPI needed) for NumPy arrays, and NCCL (``cupy.cuda.nccl``, reached through kernels.backend) for
CuPy arrays, reduced on the device; the NCCL communicator is bootstrapped over MPI (rank 0's
unique id is broadcast). A rank that raises prints its error and aborts the whole job
(MPI_Abort) instead of leaving the others waiting in a collective.

References: Goyal et al. 2017, "Accurate, Large Minibatch SGD" (gradient averaging); Akiba et al.
2017, ChainerMN (MPI + NCCL via CuPy); Sergeev & Del Balso 2018, Horovod (DistributedOptimizer,
tensor fusion = buckets); Keras 3 ``BatchNormalization(synchronized=True)``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

from kernels import backend as kernels_backend
from kernels.backend import device_of, get_array_module, is_gpu_array, to_device, to_numpy
from kernels.normalization import channel_sum
from minicnn import optimizers
from minicnn.tensor import Function, no_grad

BACKENDS = ("auto", "mpi", "nccl")
OPS = ("sum", "mean", "max", "min")
BUCKET_BYTES = 16 << 20          # gradients travel in flat buffers of at most 16 MiB each
LAUNCHER_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHER_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


# == communicators ================================================================================

class Communicator:
    """A group of ranks: ``rank``, ``size``, ``allreduce``, ``broadcast``, ``barrier``, ``abort``.

    This base class is the group of one process (rank 0 of 1): every collective leaves its array
    as it is. ``calls``, ``seconds`` and ``bytes`` count the collectives (for the benchmarks).
    """

    backend = "local"
    rank, size = 0, 1

    def __init__(self):
        self.calls, self.seconds, self.bytes = 0, 0.0, 0

    def allreduce(self, array, op="sum"):
        """Reduce ``array`` (NumPy or CuPy, contiguous) over the ranks IN PLACE and return it:
        element-wise ``op`` = "sum", "mean", "max" or "min" of every rank's array."""
        _check_buffer("allreduce", array)
        if op not in OPS:
            raise ValueError(f"allreduce: op must be one of {OPS}, got {op!r}")
        if op == "mean" and array.dtype.kind != "f":
            raise TypeError(f"allreduce: op='mean' needs a floating-point array, got {array.dtype}")
        return self._timed(self._allreduce, array, op)

    def broadcast(self, array, root=0):
        """Overwrite ``array`` (NumPy or CuPy, contiguous) on every rank with rank ``root``'s, in
        place, and return it."""
        _check_buffer("broadcast", array)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast: root must be in [0, {self.size}), got {root}")
        return self._timed(self._broadcast, array, root)

    def barrier(self) -> None:
        """Wait until every rank has reached this point."""

    def local_rank(self) -> int:
        """This rank's position among the ranks on its node (which GPU it takes)."""
        return 0

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now, with exit status ``code``."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _allreduce(self, array, op):
        return array

    def _broadcast(self, array, root):
        return array

    def _timed(self, fn, array, *args):
        started = time.perf_counter()
        try:
            return fn(array, *args)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - started
            self.bytes += array.nbytes

    def __repr__(self):
        return f"{type(self).__name__}(backend={self.backend!r}, rank={self.rank}, size={self.size})"


class MPICommunicator(Communicator):
    """Collectives of an mpi4py communicator (``MPI.COMM_WORLD`` by default) on host memory.

    NumPy arrays are reduced where they are; CuPy arrays pass through a host copy (Open MPI from
    pip is not CUDA-aware: use NCCL for GPU ranks); float16 is widened to float32 on the way.
    """

    backend = "mpi"

    def __init__(self, mpi_comm=None):
        super().__init__()
        MPI = mpi_module()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._ops = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def local_rank(self) -> int:
        return self.comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_rank()

    def _allreduce(self, array, op):
        with _host_buffer(array) as host:
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self._ops[op])
            if op == "mean":
                host /= self.size
        return array

    def _broadcast(self, array, root):
        with _host_buffer(array) as host:
            self.comm.Bcast(host, root=root)
        return array

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


@contextlib.contextmanager
def _host_buffer(array):
    """A host array MPI can work on in place; copied back into ``array`` when it was not one."""
    on_gpu = is_gpu_array(array)
    host = to_numpy(array) if on_gpu else array
    if host.dtype == np.float16:
        host = host.astype(np.float32)
    yield host
    if host is not array:
        array[...] = get_array_module(array).asarray(host).astype(array.dtype, copy=False)


class NCCLCommunicator(Communicator):
    """NCCL collectives on CuPy arrays (on the device, on CuPy's current stream), bootstrapped over
    a host communicator: each rank takes GPU ``local_rank % device count``, rank 0 draws NCCL's
    unique id, the host communicator broadcasts it, every rank joins with (size, id, rank).
    NumPy arrays go through the host communicator.

    ``nccl`` and ``cupy`` default to the modules of kernels.backend (tests pass stand-ins).
    """

    backend = "nccl"

    def __init__(self, host: Communicator, nccl=None, cupy=None):
        super().__init__()
        self.host, self.rank, self.size = host, host.rank, host.size
        self.cupy = kernels_backend.cupy_module() if cupy is None else cupy
        self.nccl = kernels_backend.nccl_module() if nccl is None else nccl
        self.device = host.local_rank() % self.cupy.cuda.runtime.getDeviceCount()
        self.cupy.cuda.Device(self.device).use()
        unique_id = self.nccl.get_unique_id() if self.rank == 0 else None
        unique_id = broadcast_unique_id(unique_id, host)
        self.comm = self.nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._types = nccl_types(self.nccl)
        self._ops = {"sum": self.nccl.NCCL_SUM, "mean": self.nccl.NCCL_SUM,
                     "max": self.nccl.NCCL_MAX, "min": self.nccl.NCCL_MIN}

    def _nccl_type(self, array):
        code = self._types.get(np.dtype(array.dtype).name)
        if code is None:
            raise TypeError(f"NCCLCommunicator: no NCCL type for dtype {array.dtype}; "
                            f"supported: {sorted(self._types)}")
        return code

    def _stream(self):
        return self.cupy.cuda.get_current_stream().ptr

    def _allreduce(self, array, op):
        if not is_gpu_array(array):
            return self.host.allreduce(array, op)
        pointer = array.data.ptr
        self.comm.allReduce(pointer, pointer, array.size, self._nccl_type(array), self._ops[op],
                            self._stream())
        if op == "mean":
            array /= self.size
        return array

    def _broadcast(self, array, root):
        if not is_gpu_array(array):
            return self.host.broadcast(array, root)
        self.comm.bcast(array.data.ptr, array.size, self._nccl_type(array), root, self._stream())
        return array

    def barrier(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        self.host.barrier()

    def abort(self, code: int = 1) -> None:
        self.host.abort(code)


def nccl_types(nccl) -> dict:
    """NumPy dtype name -> NCCL data type code, for the types this NCCL module has."""
    names = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
             "int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32",
             "uint32": "NCCL_UINT32", "int64": "NCCL_INT64", "uint64": "NCCL_UINT64"}
    return {dtype: getattr(nccl, name) for dtype, name in names.items() if hasattr(nccl, name)}


UNIQUE_ID_CAPACITY = 256       # NCCL's id is 128 bytes (NCCL_UNIQUE_ID_BYTES)


def broadcast_unique_id(unique_id, comm: Communicator, root: int = 0):
    """NCCL's unique id from rank ``root`` to every rank, through ``comm``, as numbers (no pickle).

    CuPy >= 14 gives the id as ``bytes``, older CuPy as a tuple of ints; every rank gets back the
    root's kind. Buffer: [kind (1 = bytes), length, values...] in int64.
    """
    buffer = np.zeros(2 + UNIQUE_ID_CAPACITY, dtype=np.int64)
    if comm.rank == root:
        values = list(unique_id)
        if len(values) > UNIQUE_ID_CAPACITY:
            raise ValueError(f"broadcast_unique_id: an id of {len(values)} values is longer than "
                             f"{UNIQUE_ID_CAPACITY}")
        buffer[0] = isinstance(unique_id, (bytes, bytearray))
        buffer[1] = len(values)
        buffer[2:2 + len(values)] = values
    comm.broadcast(buffer, root)
    values = buffer[2:2 + int(buffer[1])]
    return bytes(values.astype(np.uint8)) if buffer[0] else tuple(int(v) for v in values)


def _check_buffer(what, array):
    if not (isinstance(array, np.ndarray) or is_gpu_array(array)):
        raise TypeError(f"{what}: expected a NumPy or CuPy array, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what}: the array of shape {tuple(array.shape)} must be C-contiguous "
                         "(it is reduced in place)")


# == the world: init, seeds, errors ===============================================================

_world = None               # the communicator init() made
_unsynchronized = [0]       # depth of ``with unsynchronized():`` blocks


def launched_size() -> int:
    """How many ranks the MPI launcher started (1 when not under mpiexec), from its environment:
    Open MPI's OMPI_COMM_WORLD_SIZE, MPICH / Intel MPI's PMI_SIZE, MVAPICH's."""
    for name in LAUNCHER_SIZE:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def launched_rank() -> int:
    """This process's rank as the launcher's environment says (0 when not under mpiexec)."""
    for name in LAUNCHER_RANK:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def mpi_module():
    """mpi4py's MPI module (importing it initialises MPI), or RuntimeError saying how to install."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise RuntimeError("minicnn.distributed needs mpi4py and an MPI library: "
                           'pip install "minicnn[mpi]"  (mpi4py and Open MPI, no system MPI '
                           f"needed); {type(error).__name__}: {error}") from error
    return MPI


def init(backend="auto", abort_on_error=True) -> Communicator:
    """The communicator of every rank of this job (made once, then returned again).

    backend: "mpi" (mpi4py on host arrays), "nccl" (CuPy arrays through NCCL, bootstrapped over
    MPI; NumPy arrays through MPI), or "auto": a 1-rank ``Communicator`` when not started by
    mpiexec (MPI is not even imported), else NCCL when CuPy sees a GPU, else MPI.
    abort_on_error: on several ranks, an exception nobody catches prints its traceback (on the
    rank where it happened) and aborts every rank (MPI_Abort), so none is left waiting.
    """
    global _world
    if backend not in BACKENDS:
        raise ValueError(f"distributed.init: backend must be one of {BACKENDS}, got {backend!r}")
    if _world is not None and backend in ("auto", _world.backend):
        return _world
    if _world is not None and _world.size > 1:
        raise RuntimeError(f"distributed.init: already initialised with backend "
                           f"{_world.backend!r}; cannot switch to {backend!r}")
    if backend == "auto" and launched_size() <= 1:
        comm = Communicator()
    else:
        host = MPICommunicator()
        use_nccl = backend == "nccl" or (backend == "auto" and kernels_backend.gpu_available())
        comm = NCCLCommunicator(host) if use_nccl else host
    if abort_on_error and comm.size > 1:
        abort_on_uncaught_exception(comm)
    _world = comm
    return comm


def world() -> Communicator:
    """The communicator ``init`` made, or a 1-rank one before (or without) ``init``."""
    return _world if _world is not None else Communicator()


def abort_on_uncaught_exception(comm: Communicator) -> None:
    """Install a ``sys.excepthook`` that prints the error, names the rank, then ``comm.abort(1)``."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        sys.stderr.write(f"minicnn.distributed: rank {comm.rank} of {comm.size} failed; "
                         "aborting every rank\n")
        previous(kind, value, traceback)
        comm.abort(1)
    sys.excepthook = hook


def exit_status(code: int) -> int:
    """``code``; but on several ranks a failing one (code != 0) aborts them all first: a rank
    that merely exits would leave the others waiting in their next collective."""
    comm = world()
    if code and comm.size > 1:
        comm.abort(code)
    return code


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams, derived from the job's ``seed``: rank 0 keeps
    ``seed`` (so a 1-rank job draws as a plain run), the others take NumPy's SeedSequence child."""
    if rank == 0:
        return int(seed)
    state = np.random.SeedSequence(int(seed), spawn_key=(int(rank),)).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def seed(n: int, comm: Communicator | None = None) -> None:
    """``minicnn.seed`` with this rank's seed ``rank_seed(n, rank)``: ranks draw different
    dropout masks and augmentations; the weights are made equal by ``broadcast_weights``."""
    from minicnn import rng
    rng.seed(rank_seed(n, (comm or world()).rank))


# == gradients in buckets =========================================================================

def plan_buckets(arrays, bucket_bytes=BUCKET_BYTES) -> list:
    """Cut the positions of ``arrays`` into buckets, for a few large collectives instead of one
    per array: a bucket holds consecutive arrays of one dtype and device, at most
    ``bucket_bytes`` in all (an array larger than that alone). Returns lists of positions."""
    if bucket_bytes < 1:
        raise ValueError(f"plan_buckets: bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets, open_bucket, kind, filled = [], [], None, 0
    for i, array in enumerate(arrays):
        this = (np.dtype(array.dtype), device_of(array))
        if open_bucket and (this != kind or filled + array.nbytes > bucket_bytes):
            buckets.append(open_bucket)
            open_bucket, filled = [], 0
        open_bucket.append(i)
        kind, filled = this, filled + array.nbytes
    if open_bucket:
        buckets.append(open_bucket)
    return buckets


def flatten(arrays, like, dtype, extra=None):
    """One flat array (on ``like``'s device, in ``dtype``) of ``arrays`` one after the other
    (None counts as zeros of ``like[i]``'s size), then ``extra`` values if given."""
    xp = get_array_module(*like)
    parts = [xp.zeros(ref.size, dtype) if a is None else a.astype(dtype, copy=False).ravel()
             for a, ref in zip(arrays, like)]
    if extra is not None:
        parts.append(xp.asarray(extra, dtype=dtype))
    return xp.concatenate(parts)


def unflatten(flat, like) -> list:
    """Views of ``flat`` shaped like each array of ``like``, in order (the inverse of flatten)."""
    views, start = [], 0
    for ref in like:
        views.append(flat[start:start + ref.size].reshape(ref.shape))
        start += ref.size
    return views


def average_gradients(weights, comm: Communicator, bucket_bytes=BUCKET_BYTES) -> None:
    """Replace each weight's ``.grad`` by its mean over the ranks, bucket by bucket.

    A weight without a gradient on a rank counts as zeros there; one without a gradient on every
    rank keeps ``grad = None`` (the optimizer then skips it on every rank). The count of ranks
    holding each gradient travels at the end of the last bucket.
    """
    if comm.size == 1 or not weights:
        return
    buckets = plan_buckets([w.data for w in weights], bucket_bytes)
    flats = []
    for k, bucket in enumerate(buckets):
        like = [weights[i].data for i in bucket]
        held = [float(w.grad is not None) for w in weights] if k == len(buckets) - 1 else None
        flat = flatten([weights[i].grad for i in bucket], like, like[0].dtype, extra=held)
        flats.append(comm.allreduce(flat, "sum"))
    holders = to_numpy(flats[-1][-len(weights):])
    flats[-1] = flats[-1][:-len(weights)]
    for bucket, flat in zip(buckets, flats):
        flat /= comm.size
        for i, view in zip(bucket, unflatten(flat, [weights[i].data for i in bucket])):
            weights[i].grad = view if holders[i] > 0 else None


class DistributedOptimizer(optimizers.Optimizer):
    """Wrap an optimizer so that each ``step`` first averages the gradients over the ranks
    (``average_gradients``, in buckets of at most ``bucket_bytes``), then runs the wrapped step:
    every rank applies the same update to the same weights (Horovod's DistributedOptimizer).

    Everything else (learning rate, iterations, state for checkpoints, its slots) is the wrapped
    optimizer's: a checkpoint saved on N ranks resumes on any number. ``fit`` recognises it and
    shards its batches over ``comm``. Wrap outermost (around a loss-scale optimizer too), so a
    gradient overflow on one rank reaches all of them.
    """

    def __init__(self, optimizer, comm: Communicator | None = None, bucket_bytes=BUCKET_BYTES):
        # no Optimizer.__init__: every piece of state is the wrapped optimizer's
        self.__dict__["optimizer"] = optimizers.get(optimizer)
        self.__dict__["comm"] = comm if comm is not None else world()
        self.__dict__["bucket_bytes"] = int(bucket_bytes)
        if self.bucket_bytes < 1:
            raise ValueError(f"DistributedOptimizer: bucket_bytes must be >= 1, got {bucket_bytes}")

    def __getattr__(self, name):          # beta_1, epsilon ... of the wrapped optimizer
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __setattr__(self, name, value):   # learning_rate = ..., as on the wrapped optimizer
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.optimizer, name, value)

    learning_rate = property(lambda self: self.optimizer.learning_rate,
                             lambda self, value: setattr(self.optimizer, "learning_rate", value))
    iterations = property(lambda self: self.optimizer.iterations,
                          lambda self, value: setattr(self.optimizer, "iterations", value))

    def step(self, weights) -> None:
        """Average every gradient over the ranks, then the wrapped optimizer's step."""
        weights = list(weights)
        average_gradients(weights, self.comm, self.bucket_bytes)
        self.optimizer.step(weights)

    def build(self, weights) -> None:
        self.optimizer.build(weights)

    def current_learning_rate(self) -> float:
        return self.optimizer.current_learning_rate()

    def slot_names(self) -> tuple:
        return self.optimizer.slot_names()

    def get_state(self) -> dict:
        return self.optimizer.get_state()

    def set_state(self, state) -> None:
        self.optimizer.set_state(state)

    def exclude_from_weight_decay(self, var_list=None, var_names=None) -> None:
        self.optimizer.exclude_from_weight_decay(var_list, var_names)

    def get_config(self) -> dict:
        return self.optimizer.get_config()

    def __repr__(self):
        return f"DistributedOptimizer({self.optimizer!r}, {self.comm!r})"


def wrap_inside(optimizer, wrapper):
    """``wrapper(optimizer)``, but for a DistributedOptimizer ``DistributedOptimizer(wrapper(
    its optimizer))``: a loss-scale optimizer inside sees the averaged gradients, so an overflow
    on one rank makes every rank skip that step (outside, the ranks could disagree and hang)."""
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.optimizer = wrapper(optimizer.optimizer)
        return optimizer
    return wrapper(optimizer)


def unwrapped(optimizer):
    """The optimizer a DistributedOptimizer wraps, or ``optimizer`` itself."""
    return optimizer.optimizer if isinstance(optimizer, DistributedOptimizer) else optimizer


def communicator_of(model):
    """The communicator of ``model``'s DistributedOptimizer when it spans several ranks, else None
    (``fit`` and ``evaluate`` ask this)."""
    comm = getattr(getattr(model, "optimizer", None), "comm", None)
    return comm if isinstance(comm, Communicator) and comm.size > 1 else None


# == weights and statistics =======================================================================

def _each_bucket(arrays, bucket_bytes, fn) -> None:
    """fn(flat) on each bucket of ``arrays`` flattened, then the values copied back in place."""
    for bucket in plan_buckets(arrays, bucket_bytes):
        like = [arrays[i] for i in bucket]
        flat = fn(flatten(like, like, like[0].dtype))
        for array, view in zip(like, unflatten(flat, like)):
            array[...] = view


def broadcast_weights(model, comm: Communicator | None = None, root=0, build_with=None,
                      bucket_bytes=BUCKET_BYTES) -> None:
    """Give every rank rank ``root``'s weights (trainable and not), in place: call it at the start
    and after a resume (``fit`` does). A model not built yet is first built by an inference call
    on ``build_with[:1]`` (one sample of a batch), when given."""
    comm = comm or world()
    if comm.size == 1:
        return
    if not model.weights and build_with is not None:
        with no_grad():
            model(to_device(build_with[:1], model.device), training=False)
    _each_bucket([w.data for w in model.weights], bucket_bytes,
                 lambda flat: comm.broadcast(flat, root))


def average_moving_statistics(layers, comm: Communicator) -> None:
    """Average over the ranks, in place, the moving mean and variance of those of ``layers``
    (a model's BatchNormalization layers, ``training.batchnorm_layers(model)``) that are not
    synchronized: each normalised its own share, and now every rank holds the same statistics.
    Synchronized layers agree already and are left alone."""
    arrays = [w.data for layer in layers if not layer.synchronized
              for w in (layer.moving_mean, layer.moving_variance) if w is not None]
    if comm.size > 1 and arrays:
        _each_bucket(arrays, BUCKET_BYTES, lambda flat: comm.allreduce(flat, "mean"))


# == data =========================================================================================

def shard_bounds(n: int, rank: int, size: int) -> tuple:
    """[start, stop) of rank ``rank``'s contiguous share of n items: sizes differ by at most 1."""
    return n * rank // size, n * (rank + 1) // size


def sharded_array_batches(x, y, batch_size: int, shuffle: bool, comm: Communicator):
    """``(make_batches, steps)`` for ``fit`` on arrays over the ranks of ``comm``.

    Every epoch one order of the samples (rank 0's shuffle, broadcast) is cut into global batches
    of ``batch_size`` as on one process; each rank takes its contiguous ``batch_size / size`` of
    every batch, so the shares are disjoint. A last batch is cut to a multiple of ``size``
    (fewer than ``size`` samples are left out of that epoch), so all shares stay equal.
    """
    from minicnn import rng
    size, n = comm.size, len(x)
    if batch_size % size:
        raise ValueError(f"fit: batch_size={batch_size} must be a multiple of the {size} ranks "
                         "(each rank takes batch_size / ranks samples of every batch)")
    steps = n // batch_size + (1 if n % batch_size >= size else 0)

    def make_batches(epoch):
        order = rng.generator().permutation(n) if shuffle and comm.rank == 0 else np.arange(n)
        if shuffle:
            comm.broadcast(order, root=0)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            index = index[:len(index) // size * size]
            if len(index) == 0:
                break
            lo, hi = shard_bounds(len(index), comm.rank, size)
            yield x[index[lo:hi]], (None if y is None else y[index[lo:hi]])
    return make_batches, steps


# == reductions of logs ===========================================================================

def reduce_epoch(model, comm: Communicator, loss_sum: float, loss_count: int) -> tuple:
    """Sum (loss_sum, loss_count) and every compiled metric's statistics over the ranks, in
    place; every rank then logs the same epoch. Metrics name their statistics in
    ``state_names``; a metric without them keeps this rank's own value."""
    states = []
    for metric in model.compiled_metrics:
        for name in getattr(metric, "state_names", ()):
            value = getattr(metric, name)
            if value is None:
                raise RuntimeError(f"reduce_epoch: metric {metric.name!r} holds no statistics "
                                   f"on rank {comm.rank} (no batch seen)")
            states.append((metric, name, to_numpy(value)))
    flat = np.concatenate([np.array([loss_sum, loss_count], np.float64)] +
                          [np.asarray(s, np.float64).ravel() for _, _, s in states])
    comm.allreduce(flat, "sum")
    start = 2
    for metric, name, host in states:
        total = flat[start:start + host.size].reshape(host.shape)
        start += host.size
        setattr(metric, name, to_device(total, device_of(getattr(metric, name))))
    return float(flat[0]), int(round(flat[1]))


# == synchronized batch normalisation =============================================================

@contextlib.contextmanager
def unsynchronized():
    """Within this block, synchronized BatchNormalization layers use this rank's batch alone (for
    work one rank does by itself, or that every rank repeats on the same data)."""
    _unsynchronized[0] += 1
    try:
        yield
    finally:
        _unsynchronized[0] -= 1


def batch_norm_function(epsilon, comm: Communicator | None = None):
    """The training-mode Function of a synchronized BatchNormalization layer: SyncBatchNorm over
    ``comm`` (the world by default) on several ranks, else the plain one-process BatchNorm."""
    from minicnn.functions.normalization import BatchNorm
    comm = comm or world()
    if comm.size == 1 or _unsynchronized[0]:
        return BatchNorm(epsilon)
    return SyncBatchNorm(epsilon, comm)


class SyncBatchNorm(Function):
    """Training-mode batch normalisation over the global batch: inputs (x, gamma, beta), x this
    rank's share (..., C); M_r values per channel here, M = sum_r M_r.

        mean = (1/M) sum_r sum x,   var = (1/M) sum_r sum (x - mean)^2     (two allreduces)
        y    = gamma (x - mean) inv_std + beta,   inv_std = 1 / sqrt(var + epsilon)
    backward (one allreduce), x_hat = (x - mean) inv_std:
        dx     = gamma inv_std (dy - S_dy / M - x_hat S_dyxhat / M),  S summed over every rank
        dgamma = sum dy x_hat,  dbeta = sum dy   over this rank only (the optimizer's average
                                                 over the ranks adds the shares up)
    Each rank's loss is a mean over its own share: its dy is N times its part of the global
    loss's, the same factor on every rank, so dx and the averaged weight gradients are exactly
    the global batch's. The statistics are added in float64. ``batch_mean`` / ``batch_var`` are
    left for the layer's moving averages, as by BatchNorm.
    """

    def __init__(self, epsilon, comm: Communicator):
        self.epsilon, self.comm = float(epsilon), comm

    def _global_sum(self, *parts):
        """This rank's sums (arrays or numbers) added up over every rank in float64, in one
        allreduce; one flat float64 array back."""
        xp = get_array_module(*[p for p in parts if not np.isscalar(p)])
        flat = xp.concatenate([xp.asarray(p, dtype=xp.float64).ravel() for p in parts])
        return self.comm.allreduce(flat, "sum")

    def forward(self, x, gamma, beta):
        if x.ndim < 2 or x.dtype.kind != "f":
            raise ValueError(f"SyncBatchNorm: x must be floating point (..., C), got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        channels = x.shape[-1]
        sums = self._global_sum(channel_sum(x), x.size // channels)      # [sum x, M]
        self.count = float(sums[channels])
        mean = (sums[:channels] / self.count).astype(x.dtype)
        x_centered = x - mean
        var = (self._global_sum(channel_sum(x_centered * x_centered)) / self.count).astype(x.dtype)
        inv_std = 1 / get_array_module(x).sqrt(var + self.epsilon)
        self.batch_mean, self.batch_var = mean, var
        y = x_centered * (gamma.astype(x.dtype, copy=False) * inv_std)
        y += beta.astype(x.dtype, copy=False)
        self.x_centered, self.inv_std, self.gamma, self.beta_dtype = x_centered, inv_std, gamma, \
            beta.dtype
        return y

    def backward(self, dy):
        need_x, need_gamma, need_beta = self.needs_input_grad
        dbeta = channel_sum(dy)                                  # sum dy, this rank
        dyxc = channel_sum(dy * self.x_centered)                  # sum dy (x - mean), this rank
        dx = None
        if need_x:
            s_dy, s_dyxc = self._global_sum(dbeta, dyxc).astype(dy.dtype).reshape(2, -1)
            k = self.gamma.astype(dy.dtype, copy=False) * self.inv_std
            dx = dy * k
            dx += self.x_centered * (-k * self.inv_std ** 2 * s_dyxc / self.count)
            dx += -k * s_dy / self.count
        return (dx,
                (dyxc * self.inv_std).astype(self.gamma.dtype, copy=False) if need_gamma else None,
                dbeta.astype(self.beta_dtype, copy=False) if need_beta else None)
