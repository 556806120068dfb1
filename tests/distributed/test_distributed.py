"""minicnn.distributed in one process: ranks as threads (fakes.ThreadCommunicator), NCCL and CuPy
stand-ins; the multi-process runs under mpiexec are in test_mpi.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fakes  # noqa: E402

import minicnn as mc  # noqa: E402
from minicnn import distributed as D  # noqa: E402
from minicnn import io, layers as kl  # noqa: E402
from minicnn.functions.normalization import BatchNorm  # noqa: E402
from minicnn.tensor import Tensor  # noqa: E402
from minicnn.callbacks import CSVLogger, ModelCheckpoint, ReduceLROnPlateau  # noqa: E402
from minicnn.training import batchnorm_layers  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_world(monkeypatch):
    """No communicator left over between tests, and no MPI launcher in the environment."""
    monkeypatch.setattr(D, "_world", None)
    for name in D.LAUNCHER_SIZE + D.LAUNCHER_RANK:
        monkeypatch.delenv(name, raising=False)


# -- the one-rank communicator and init ----------------------------------------------------------

def test_one_rank_collectives_leave_arrays_as_they_are():
    comm = D.Communicator()
    a = np.arange(6.0)
    assert comm.allreduce(a, "mean") is a and np.array_equal(a, np.arange(6.0))
    assert comm.broadcast(a) is a and comm.calls == 2 and comm.bytes == 2 * a.nbytes
    assert (comm.rank, comm.size, comm.local_rank()) == (0, 1, 0)


@pytest.mark.parametrize("array, kwargs, error, words", [
    (np.zeros(3), {"op": "avg"}, ValueError, "op must be one of"),
    (np.zeros((3, 4))[:, 1], {}, ValueError, "C-contiguous"),
    ([1.0, 2.0], {}, TypeError, "NumPy or CuPy array"),
    (np.zeros(3, np.int64), {"op": "mean"}, TypeError, "floating-point"),
])
def test_allreduce_rejects_bad_input(array, kwargs, error, words):
    with pytest.raises(error, match=words):
        D.Communicator().allreduce(array, **kwargs)


def test_broadcast_rejects_a_root_outside_the_group():
    with pytest.raises(ValueError, match=r"root must be in \[0, 1\)"):
        D.Communicator().broadcast(np.zeros(2), root=1)


def test_init_outside_mpiexec_is_one_rank_and_needs_no_mpi(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # as if mpi4py were absent
    comm = D.init()
    assert type(comm) is D.Communicator and comm.size == 1 and D.world() is comm
    assert D.init("auto") is comm
    with pytest.raises(RuntimeError, match=r'pip install "minicnn\[mpi\]"'):
        D.init("mpi")


def test_init_under_mpiexec_without_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert D.launched_size() == 2
    with pytest.raises(RuntimeError, match="needs mpi4py"):
        D.init()


def test_init_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        D.init("gloo")


def test_launcher_environment_gives_size_and_rank(monkeypatch):
    assert (D.launched_size(), D.launched_rank()) == (1, 0)
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "3")
    assert (D.launched_size(), D.launched_rank()) == (4, 3)


def test_rank_seeds_are_derived_and_distinct():
    assert D.rank_seed(5, 0) == 5
    seeds = [D.rank_seed(5, r) for r in range(1, 8)] + [D.rank_seed(6, 1)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert D.rank_seed(5, 3) == D.rank_seed(5, 3)


def test_exit_status_aborts_only_a_failing_rank_of_several(monkeypatch):
    assert D.exit_status(2) == 2                               # one process: just the code
    aborted = []

    class Pair(D.Communicator):
        rank, size = 1, 2

        def abort(self, code=1):
            aborted.append(code)
    monkeypatch.setattr(D, "_world", Pair())
    assert D.exit_status(0) == 0 and aborted == []
    D.exit_status(3)
    assert aborted == [3]


# -- buckets ---------------------------------------------------------------------------------------

arrays_strategy = st.lists(st.tuples(st.integers(1, 40), st.sampled_from(["float32", "float64"])),
                           min_size=1, max_size=12)


@given(arrays_strategy, st.integers(8, 400))
def test_buckets_keep_order_one_dtype_and_the_size_limit(specs, limit):
    arrays = [np.zeros(n, dtype) for n, dtype in specs]
    buckets = D.plan_buckets(arrays, limit)
    assert [i for b in buckets for i in b] == list(range(len(arrays)))
    for b in buckets:
        assert len({arrays[i].dtype for i in b}) == 1
        assert len(b) == 1 or sum(arrays[i].nbytes for i in b) <= limit
    for b, c in zip(buckets, buckets[1:]):          # a bucket closes only when it must
        if arrays[b[0]].dtype == arrays[c[0]].dtype:
            assert sum(arrays[i].nbytes for i in b) + arrays[c[0]].nbytes > limit


def test_flatten_and_unflatten_are_inverse():
    like = [np.zeros((2, 3)), np.zeros(4), np.zeros((1, 1, 2))]
    values = [np.arange(6.0).reshape(2, 3), None, np.array([[[7.0, 8.0]]])]
    flat = D.flatten(values, like, np.float64, extra=[1.0, 0.0])
    assert flat.shape == (14,) and np.array_equal(flat[-2:], [1.0, 0.0])
    back = D.unflatten(flat[:-2], like)
    assert np.array_equal(back[0], values[0]) and np.array_equal(back[1], np.zeros(4))
    assert np.array_equal(back[2], values[2])


def make_weights(rank, present):
    rng = np.random.default_rng(rank)
    shapes = [(3, 3, 2, 4), (4,), (5, 2), (7,)]
    weights = []
    for i, shape in enumerate(shapes):
        w = Tensor(np.zeros(shape), requires_grad=True)
        w.grad = rng.normal(size=shape) if present(rank, i) else None
        weights.append(w)
    return weights


def test_gradients_are_averaged_in_buckets():
    present = lambda rank, i: not (i == 2 and rank == 1) and i != 3  # noqa: E731
    grads = {}

    def run(comm):
        weights = make_weights(comm.rank, present)
        grads[comm.rank] = [None if w.grad is None else w.grad.copy() for w in weights]
        D.average_gradients(weights, comm, bucket_bytes=200)
        return weights, comm.calls
    results = fakes.run_ranks(3, run)
    like = [np.zeros(s) for s in [(3, 3, 2, 4), (4,), (5, 2), (7,)]]
    buckets = D.plan_buckets(like, 200)
    for weights, calls in results:
        assert calls == len(buckets) >= 2
        for i in range(3):
            want = sum(grads[r][i] if grads[r][i] is not None else 0 for r in range(3)) / 3
            np.testing.assert_allclose(weights[i].grad, want, rtol=1e-15, atol=1e-15)
        assert weights[3].grad is None                   # no rank had one: still none
    for i in range(3):
        assert all(np.array_equal(results[0][0][i].grad, r[0][i].grad) for r in results)


# -- the optimizer wrapper -------------------------------------------------------------------------

def test_distributed_optimizer_is_the_wrapped_optimizer_to_everyone_else():
    inner = mc.optimizers.Adam(1e-3, beta_1=0.8)
    opt = D.DistributedOptimizer(inner, D.Communicator())
    assert mc.optimizers.get(opt) is opt and opt.beta_1 == 0.8 and opt.name == inner.name
    opt.learning_rate = 0.5
    assert inner.learning_rate == 0.5 and opt.current_learning_rate() == 0.5
    w = Tensor(np.ones(3), requires_grad=True)
    w.grad = np.full(3, 0.25)
    opt.step([w])
    assert opt.iterations == inner.iterations == 1
    state = opt.get_state()
    fresh = mc.optimizers.Adam(1e-3, beta_1=0.8)
    D.DistributedOptimizer(fresh).set_state(state)
    assert fresh.iterations == 1 and fresh.get_config() == opt.get_config()
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1"):
        D.DistributedOptimizer(inner, bucket_bytes=0)


def test_reduce_lr_on_plateau_reaches_the_wrapped_optimizer():
    model = small_model()
    model.compile(optimizer=D.DistributedOptimizer(mc.optimizers.SGD(0.1)),
                  loss=mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = ReduceLROnPlateau(monitor="loss", patience=1, factor=0.5)
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_end(0, {"loss": 1.0})
    callback.on_epoch_end(1, {"loss": 2.0})
    assert model.optimizer.optimizer.learning_rate == pytest.approx(0.05)


def test_each_rank_applies_the_update_of_the_mean_gradient():
    start = np.linspace(-1, 1, 6)
    grads = [np.arange(6.0), -np.arange(6.0) * 3]

    def run(comm):
        w = Tensor(start.copy(), requires_grad=True)
        w.grad = grads[comm.rank].copy()
        D.DistributedOptimizer(mc.optimizers.Adam(0.1), comm).step([w])
        return w.data
    got = fakes.run_ranks(2, run)
    w = Tensor(start.copy(), requires_grad=True)
    w.grad = (grads[0] + grads[1]) / 2
    mc.optimizers.Adam(0.1).step([w])
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], w.data)


# -- synchronized batch normalisation --------------------------------------------------------------

@settings(max_examples=10)
@given(st.lists(st.integers(1, 3), min_size=2, max_size=3), st.integers(1, 4),
       st.integers(1, 3), st.integers(1, 5), st.sampled_from(["float64", "float32"]))
def test_sync_batchnorm_on_shares_equals_batchnorm_on_the_whole(shares, h, w, c, dtype):
    """Ranks holding 1-3 samples each (unequal shares too) give the outputs, statistics and
    input gradients of one BatchNorm over all the samples; their gamma/beta gradients add up
    to its own."""
    rng = np.random.default_rng(sum(shares) * 100 + h * 10 + c)
    x = (rng.normal(size=(sum(shares), h, w, c)) * 3 + 1).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    gamma, beta = rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)
    whole = BatchNorm(1e-3)
    xt, gt, bt = (Tensor(a, requires_grad=True) for a in (x, gamma, beta))
    y_whole = whole(xt, gt, bt)
    mean_whole, var_whole = whole.batch_mean, whole.batch_var
    y_whole.backward(dy)
    bounds = np.cumsum([0] + shares)

    def run(comm):
        part = slice(bounds[comm.rank], bounds[comm.rank + 1])
        fn = D.SyncBatchNorm(1e-3, comm)
        ts = [Tensor(a, requires_grad=True) for a in (x[part], gamma, beta)]
        y = fn(*ts)
        mean, var = fn.batch_mean, fn.batch_var          # backward frees what fn kept
        y.backward(dy[part])
        return y.data, mean, var, [t.grad for t in ts]
    results = fakes.run_ranks(len(shares), run)
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y_whole.data, atol=tol)
    np.testing.assert_allclose(results[0][1], mean_whole, atol=tol, rtol=tol)
    np.testing.assert_allclose(results[0][2], var_whole, atol=tol, rtol=tol)
    np.testing.assert_allclose(np.concatenate([r[3][0] for r in results]), xt.grad, atol=tol)
    np.testing.assert_allclose(sum(r[3][1] for r in results), gt.grad, atol=tol, rtol=tol)
    np.testing.assert_allclose(sum(r[3][2] for r in results), bt.grad, atol=tol, rtol=tol)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_sync_batchnorm_gradcheck_on_one_rank(n, h, w, c):
    rng = np.random.default_rng(n * 27 + h * 9 + w * 3 + c)
    x = rng.normal(size=(n, h, w, c))
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    assert mc.gradcheck(lambda a, g, b: D.SyncBatchNorm(1e-3, D.Communicator())(a, g, b),
                        x, gamma, beta)


def test_sync_batchnorm_rejects_integer_input():
    with pytest.raises(ValueError, match="SyncBatchNorm: x must be floating point"):
        D.SyncBatchNorm(1e-3, D.Communicator()).forward(np.ones((2, 3), np.int64),
                                                        np.ones(3), np.zeros(3))


def test_which_batchnorm_a_synchronized_layer_runs():
    pair = fakes.ThreadCommunicator(fakes.ThreadGroup(2), 0)
    assert type(D.batch_norm_function(1e-3)) is BatchNorm           # one process
    assert type(D.batch_norm_function(1e-3, pair)) is D.SyncBatchNorm
    with D.unsynchronized():
        assert type(D.batch_norm_function(1e-3, pair)) is BatchNorm


def test_synchronized_layer_on_one_process_is_the_plain_layer(rng):
    x = rng.normal(size=(4, 5, 5, 3)).astype(np.float32)
    plain, synced = kl.BatchNormalization(), kl.BatchNormalization(synchronized=True)
    assert np.array_equal(plain(x, training=True).numpy(), synced(x, training=True).numpy())
    assert np.array_equal(plain.moving_variance.numpy(), synced.moving_variance.numpy())
    config = synced.get_config()
    assert config["synchronized"] is True
    assert kl.BatchNormalization(**config).synchronized is True


def test_a_saved_functional_model_keeps_the_setting(tmp_path):
    io.save_model(small_model(synchronized=True), tmp_path / "model.npz")
    (layer,) = batchnorm_layers(io.load_model(tmp_path / "model.npz"))
    assert layer.synchronized is True


# -- weights, statistics, data, logs ---------------------------------------------------------------

def small_model(seed=0, synchronized=False):
    mc.seed(seed)
    inputs = kl.Input((4, 4, 1))
    h = kl.BatchNormalization(synchronized=synchronized)(kl.Conv2D(2, 3, padding="same")(inputs))
    return mc.Model(inputs, kl.Conv2D(2, 1)(h))


def test_broadcast_weights_gives_every_rank_the_root_weights():
    models = [small_model(seed) for seed in range(3)]
    want = [w.numpy().copy() for w in models[1].weights]
    fakes.run_ranks(3, lambda comm: D.broadcast_weights(models[comm.rank], comm, root=1))
    for model in models:
        assert all(np.array_equal(w.numpy(), v) for w, v in zip(model.weights, want))


def test_broadcast_weights_builds_a_lazy_model_first():
    models = []
    for seed in range(2):
        mc.seed(seed)
        models.append(mc.Sequential([kl.Conv2D(2, 3), kl.BatchNormalization()]))
    x = np.ones((3, 5, 5, 1), np.float32)
    models[0].build(x.shape)          # only rank 1 builds inside (no_grad is process-wide)
    fakes.run_ranks(2, lambda comm: D.broadcast_weights(models[comm.rank], comm, build_with=x))
    assert len(models[1].weights) == 6
    assert all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(models[0].weights, models[1].weights))


def test_moving_statistics_of_unsynchronized_layers_are_averaged():
    plain = [small_model(0) for _ in range(2)]                  # one model per rank
    synced = [small_model(0, synchronized=True) for _ in range(2)]
    for rank in range(2):
        for model in (plain[rank], synced[rank]):
            batchnorm_layers(model)[0].moving_mean.data[...] = rank + 1.0
    fakes.run_ranks(2, lambda comm: D.average_moving_statistics(
        batchnorm_layers(plain[comm.rank]) + batchnorm_layers(synced[comm.rank]), comm))
    for rank in range(2):
        assert np.all(batchnorm_layers(plain[rank])[0].moving_mean.numpy() == 1.5)
        assert np.all(batchnorm_layers(synced[rank])[0].moving_mean.numpy() == rank + 1.0)


@pytest.mark.parametrize("n, batch, size, sizes", [
    (10, 4, 2, [4, 4, 2]), (9, 4, 2, [4, 4]), (12, 6, 3, [6, 6]), (7, 6, 3, [6])])
def test_shards_are_disjoint_and_make_up_one_process_batches(n, batch, size, sizes):
    x = np.arange(n)[:, None] * 1.0
    y = np.arange(n)

    def run(comm):
        mc.seed(4)
        make, steps = D.sharded_array_batches(x, y, batch, True, comm)
        return steps, [(xb[:, 0], yb) for xb, yb in make(0)]
    results = fakes.run_ranks(size, run)
    mc.seed(4)
    order = mc.rng.generator().permutation(n)
    assert all(r[0] == len(sizes) for r in results)
    start = 0
    for k, global_size in enumerate(sizes):
        shares = [r[1][k] for r in results]
        assert all(len(s[1]) == global_size // size for s in shares)
        assert np.array_equal(np.concatenate([s[1] for s in shares]),
                              order[start:start + global_size])
        assert all(np.array_equal(s[0], s[1]) for s in shares)
        start += batch


def test_sharding_needs_a_batch_divisible_by_the_ranks():
    pair = fakes.ThreadCommunicator(fakes.ThreadGroup(3), 0)
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple of the 3 ranks"):
        D.sharded_array_batches(np.zeros((8, 1)), None, 4, False, pair)


def test_epoch_logs_are_summed_over_ranks(rng):
    y = rng.integers(0, 3, size=(6, 4, 4))
    p = rng.normal(size=(6, 4, 4, 3))
    metrics = ["pixel_accuracy", mc.metrics.MeanIoU(3)]
    whole = [mc.metrics.get(m) if isinstance(m, str) else mc.metrics.MeanIoU(3) for m in metrics]
    for m in whole:
        m.update_state(y, p)

    def run(comm):
        holder = type("Holder", (), {})()
        holder.compiled_metrics = [mc.metrics.PixelAccuracy(), mc.metrics.MeanIoU(3)]
        part = slice(comm.rank * 3, comm.rank * 3 + 3)
        for m in holder.compiled_metrics:
            m.update_state(y[part], p[part])
        loss = D.reduce_epoch(holder, comm, 1.5 * (comm.rank + 1), 3)
        return loss, [m.result() for m in holder.compiled_metrics]
    for loss, results in fakes.run_ranks(2, run):
        assert loss == (4.5, 6)
        assert results == pytest.approx([m.result() for m in whole], rel=1e-12)


class LoneRank(D.Communicator):
    """Rank 1 of 2 whose collectives leave arrays alone (to watch what rank 1 does)."""
    rank, size = 1, 2


def test_rank_other_than_zero_prints_and_writes_nothing(tmp_path, capsys, rng):
    model = small_model()
    model.compile(D.DistributedOptimizer(mc.optimizers.SGD(0.1), LoneRank()),
                  mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.normal(size=(8, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 2, size=(8, 4, 4))
    model.fit(x, y, batch_size=4, epochs=1, verbose=1,
              callbacks=[ModelCheckpoint(tmp_path / "c.npz", monitor="loss"),
                         CSVLogger(tmp_path / "log.csv")])
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr().out == ""


# -- NCCL, with stand-ins --------------------------------------------------------------------------

@pytest.mark.parametrize("unique_id", [bytes(range(128)), tuple(range(-64, 64))])
def test_unique_id_reaches_every_rank_as_the_root_gave_it(unique_id):
    got = fakes.run_ranks(3, lambda comm: D.broadcast_unique_id(
        unique_id if comm.rank == 0 else None, comm))
    assert all(g == unique_id and type(g) is type(unique_id) for g in got)


def test_unique_id_longer_than_the_buffer_is_refused():
    with pytest.raises(ValueError, match="longer than 256"):
        D.broadcast_unique_id(bytes(300), D.Communicator())


def test_nccl_bootstrap_and_device_calls():
    nccls = [fakes.fake_nccl(), fakes.fake_nccl()]
    cupys = [fakes.fake_cupy(devices=4), fakes.fake_cupy(devices=4)]
    comms = fakes.run_ranks(2, lambda host: D.NCCLCommunicator(
        host, nccl=nccls[host.rank], cupy=cupys[host.rank]))
    drawn = nccls[0].calls[0][1]
    assert [c[0] for c in nccls[0].calls] == ["get_unique_id", "init"]
    assert [c[0] for c in nccls[1].calls] == ["init"]
    assert nccls[1].calls[0] == ("init", 2, drawn, 1) and nccls[0].calls[1] == ("init", 2, drawn, 0)
    assert [c.used for c in cupys] == [[0], [1]]          # local rank % 4 devices

    comm, nccl = comms[1], nccls[1]
    a = fakes.FakeDeviceArray(np.arange(6, dtype=np.float32))
    assert comm.allreduce(a, "mean") is a
    assert nccl.calls[-1] == ("allReduce", a.data.ptr, a.data.ptr, 6, nccl.NCCL_FLOAT32,
                              nccl.NCCL_SUM, 77)
    assert np.array_equal(a.values, np.arange(6) / 2)   # the fake leaves the sum: then / size
    b = fakes.FakeDeviceArray(np.ones(3, dtype=np.float64))
    comm.allreduce(b, "max")
    assert nccl.calls[-1][3:6] == (3, nccl.NCCL_FLOAT64, nccl.NCCL_MAX)
    comm.broadcast(b, root=0)
    assert nccl.calls[-1] == ("bcast", b.data.ptr, 3, nccl.NCCL_FLOAT64, 0, 77)
    with pytest.raises(TypeError, match="no NCCL type for dtype complex128"):
        comm.allreduce(fakes.FakeDeviceArray(np.ones(2, np.complex128)))


def test_nccl_communicator_sends_host_arrays_through_mpi():
    def run(host):
        comm = D.NCCLCommunicator(host, nccl=fakes.fake_nccl(), cupy=fakes.fake_cupy())
        a = comm.allreduce(np.full(3, host.rank + 1.0))
        return a, comm.host.calls
    for a, calls in fakes.run_ranks(2, run):
        assert np.array_equal(a, [3.0, 3.0, 3.0]) and calls == 2     # the id, then the array


def test_without_mpi4py_the_multi_process_tests_skip_saying_why():
    code = ("import sys; sys.modules['mpi4py'] = None; import pytest; sys.exit(pytest.main("
            f"['-q', '-rs', '-p', 'no:cacheprovider', {str(HERE / 'test_mpi.py')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=HERE.parent.parent)
    assert "SKIPPED" in run.stdout and "mpi4py is not installed" in run.stdout, run.stdout
    assert "passed" not in run.stdout and "failed" not in run.stdout and "error" not in run.stdout


def test_mixed_float16_puts_the_loss_scale_inside_the_distributed_optimizer():
    """compile's automatic LossScaleOptimizer goes inside: it then sees the averaged
    gradients, so all ranks skip an overflowing step together."""
    try:
        mc.mixed_precision.set_global_policy("mixed_float16")
        model = small_model()
    finally:
        mc.mixed_precision.set_global_policy("float32")
    model.compile(D.DistributedOptimizer(mc.optimizers.Adam(1e-3)),
                  mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert type(model.optimizer) is D.DistributedOptimizer
    assert type(model.optimizer.optimizer) is mc.mixed_precision.LossScaleOptimizer
    assert model.optimizer.scale_loss is not None                # what train_step asks for
    model.compile(model.optimizer, mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert type(model.optimizer.optimizer.inner_optimizer) is mc.optimizers.Adam  # not twice
