"""Multi-process tests: each launches ``mpiexec -n 2`` (mpi_worker.py, or the ``minicnn``
command) as a subprocess with a timeout, so a hang fails the test instead of stalling the run.
They need the [mpi] extra (mpi4py and Open MPI); without it they skip, saying so."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason='mpi4py is not installed: pip install -e ".[mpi]" '
                                     "(mpi4py and Open MPI) to run the multi-process tests")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scenarios as S  # noqa: E402

import minicnn as mc  # noqa: E402
from minicnn import cli, io  # noqa: E402
from minicnn.callbacks import ModelCheckpoint  # noqa: E402

BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN + os.pathsep + os.environ.get("PATH", ""))
if MPIEXEC is None:
    pytest.skip("mpi4py is installed but no mpiexec is found next to Python or on PATH "
                '(pip install -e ".[mpi]" brings Open MPI\'s)', allow_module_level=True)

pytestmark = pytest.mark.mpi

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
CLI_ARGS = ["--steps-per-epoch", "2", "--crop", "32", "--depth", "1", "--base-filters", "4",
            "--batch-size", "4", "--no-augment"]


def launch(command, timeout, ranks=2):
    """Run ``mpiexec -n ranks command`` in its own process group; (exit code, output, end
    time). A run past ``timeout`` seconds is killed and the test fails as a hang."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               MINICNN_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [MPIEXEC, "-n", str(ranks), "--oversubscribe", "--bind-to", "none"] + \
        [str(part) for part in command]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"mpiexec did not end within {timeout} s (a hang):\n{output[-4000:]}")
    return process.returncode, output, time.time()


def worker(scenario, folder, timeout):
    return launch([sys.executable, HERE / "mpi_worker.py", scenario, folder], timeout)


def minicnn_command():
    script = os.path.join(BIN, "minicnn")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "minicnn.cli"]


# -- one-process references ------------------------------------------------------------------------

def one_process_run(name, epochs=S.EPOCHS, callbacks=()):
    mc.seed(S.SEED)
    (x, y), validation = S.data(S.CONFIGS[name][0])
    model = S.compile_model(S.model_for(name), S.optimizer_for(name))
    recorder = S.Recorder()
    history = model.fit(x, y, batch_size=S.BATCH, epochs=epochs, verbose=0,
                        validation_data=validation, callbacks=[recorder, *callbacks])
    return model, recorder.steps, history.history


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The 'train' scenario on 2 ranks, once for the module; its folder."""
    folder = tmp_path_factory.mktemp("mpi_train")
    one_process_run("sync64", epochs=1,
                    callbacks=[ModelCheckpoint(folder / "one_rank.npz", save_best_only=False)])
    code, output, _ = worker("train", folder, timeout=600)
    assert code == 0, output[-4000:]
    return folder


@pytest.fixture(scope="module")
def references():
    return {name: one_process_run(name) for name in S.CONFIGS}


def assert_close(got, want, dtype, what):
    """Every weight within TOLERANCE[dtype] of the reference, relative to the largest weight."""
    tol = TOLERANCE[dtype]
    scale = max(float(np.abs(w).max()) for w in want)
    for i, (a, b) in enumerate(zip(got, want)):
        error = float(np.abs(a - b).max()) / scale
        assert error <= tol, f"{what}: weight {i} differs by {error:.3g} (relative) > {tol}"


# -- equivalence -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(S.CONFIGS))
def test_weights_identical_on_every_rank_after_every_step(trained, name):
    steps0, _ = S.load_steps(trained / f"{name}_rank0.npz")
    steps1, _ = S.load_steps(trained / f"{name}_rank1.npz")
    assert len(steps0) == len(steps1) == S.EPOCHS * S.SAMPLES // S.BATCH
    for k, (a, b) in enumerate(zip(steps0, steps1)):
        for i, (wa, wb) in enumerate(zip(a, b)):
            assert np.array_equal(wa, wb), f"{name}: weight {i} differs between ranks at step {k}"


@pytest.mark.parametrize("name", ["plain64", "sync64", "sync32", "plain32"])
def test_two_ranks_of_half_batches_train_as_one_process(trained, references, name):
    """2 ranks x batch 4 == 1 process x batch 8, at every step (float64 1e-10, float32 1e-5)."""
    steps, _ = S.load_steps(trained / f"{name}_rank0.npz")
    _, want, _ = references[name]
    assert len(steps) == len(want)
    for k, (got, expected) in enumerate(zip(steps, want)):
        assert_close(got, expected, S.CONFIGS[name][0], f"{name} step {k}")


def test_unsynchronized_batchnorm_trains_as_micro_batches(trained):
    """Each rank normalising its own half == one process averaging the two halves' gradients
    (and moving statistics), as PyTorch DDP with plain BatchNorm does."""
    steps, _ = S.load_steps(trained / "local64_rank0.npz")
    want = S.micro_batch_reference("local64")
    for k, (got, expected) in enumerate(zip(steps, want)):
        assert_close(got, expected, "float64", f"local64 step {k}")


def test_synchronization_changes_the_result(trained, references):
    """The equivalence above is not an accident: per-rank statistics train differently."""
    local, _ = S.load_steps(trained / "local64_rank0.npz")
    _, synced, _ = references["sync64"]
    scale = max(float(np.abs(w).max()) for w in synced[-1])
    error = max(float(np.abs(a - b).max()) for a, b in zip(local[-1], synced[-1])) / scale
    assert error > 1e-4


@pytest.mark.parametrize("name", ["plain64", "sync64"])
def test_logs_are_reduced_over_ranks(trained, references, name):
    """Training loss, pixel accuracy, mean IoU and the validation scores (the ranks score 2 and
    3 of the 5 validation samples) equal one process's."""
    with open(trained / f"{name}_rank1.json") as handle:
        logs = json.load(handle)
    _, _, want = references[name]
    assert set(logs) == set(want) and "val_mean_iou" in logs
    for key in want:
        np.testing.assert_allclose(logs[key], want[key], rtol=1e-10, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name, per_step", [("plain64", 1), ("sync64", 4), ("local64", 2)])
def test_gradients_travel_in_one_bucket(trained, name, per_step):
    """Within an epoch a step makes 1 allreduce for all gradients (not one per weight), plus 3
    per synchronized BN layer (2 forward, 1 backward) or 1 for unsynchronized moving stats."""
    _, extra = S.load_steps(trained / f"{name}_rank0.npz")
    calls = extra["calls"]
    steps_per_epoch = S.SAMPLES // S.BATCH
    within = [calls[k] - calls[k - 1] for k in range(1, len(calls)) if k % steps_per_epoch]
    assert within == [per_step] * len(within)


# -- resume with another rank count ----------------------------------------------------------------

def test_two_rank_checkpoint_resumes_on_one_process(trained, references):
    mc.seed(S.SEED + 1)
    (x, y), _ = S.data("float64")
    model = S.compile_model(S.model_for("sync64"), S.optimizer_for("sync64"))
    manifest = io.load_checkpoint(trained / "sync64_epoch1.npz", model)
    assert manifest["epoch"] == 1
    model.fit(x, y, batch_size=S.BATCH, epochs=S.EPOCHS, initial_epoch=1, verbose=0)
    _, want, _ = references["sync64"]
    assert_close(S.all_weights(model), want[-1], "float64", "resumed on 1 process")


def test_one_process_checkpoint_resumes_on_two_ranks(trained, references):
    got0, _ = S.load_steps(trained / "resumed_rank0.npz")
    got1, _ = S.load_steps(trained / "resumed_rank1.npz")
    _, want, _ = references["sync64"]
    assert_close(got0[0], want[-1], "float64", "resumed on 2 ranks")
    assert all(np.array_equal(a, b) for a, b in zip(got0[0], got1[0]))


# -- NCCL bootstrap --------------------------------------------------------------------------------

def test_nccl_unique_id_is_broadcast_over_mpi(trained):
    """Rank 0 alone draws NCCL's id; MPI carries it; both ranks join with (2, that id, rank)."""
    seen = [json.loads((trained / f"nccl_rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["drew_id"] == 1 and seen[1]["drew_id"] == 0
    assert len(seen[0]["id"]) == 128 and seen[0]["id"] == seen[1]["id"]
    assert [s["rank"] for s in seen] == [0, 1] and [s["size"] for s in seen] == [2, 2]
    assert [s["device"] for s in seen] == [[0], [0]]         # local rank % 1 device


# -- failures --------------------------------------------------------------------------------------

def seconds_since_failure(folder, ended):
    return ended - float((Path(folder) / "raised_at").read_text())


def test_a_rank_that_raises_ends_every_rank(tmp_path):
    code, output, ended = worker("raise", tmp_path, timeout=120)
    assert code != 0
    assert seconds_since_failure(tmp_path, ended) < 10, output
    assert output.count("ValueError: rank 1: a bad batch at step 3") == 1, output
    assert output.count("rank 1 of 2 failed") == 1 and "rank 0 of 2 failed" not in output


def test_a_rank_that_exits_with_an_error_ends_every_rank(tmp_path):
    code, output, ended = worker("exit", tmp_path, timeout=120)
    assert code == 3, output
    assert seconds_since_failure(tmp_path, ended) < 10, output


def test_checkpoint_stays_whole_when_a_rank_dies_during_the_write(tmp_path):
    """Rank 0 is killed half-way through writing epoch 2's checkpoint: last.npz still holds
    epoch 1 intact; the half-written bytes sit in a temporary file that was never renamed."""
    code, output, ended = worker("checkpoint", tmp_path, timeout=120)
    assert code != 0
    assert seconds_since_failure(tmp_path, ended) < 15, output     # not the 120 s stall
    assert output.count("rank 1 of 2 failed") == 1, output
    (want,), _ = S.load_steps(tmp_path / "epoch1.npz")
    model = S.compile_model(S.model_for("sync64"), S.optimizer_for("sync64"))
    assert io.load_checkpoint(tmp_path / "last.npz", model)["epoch"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(S.all_weights(model), want))
    leftovers = glob.glob(str(tmp_path / ".tmp-*.npz"))
    assert len(leftovers) == 1
    with pytest.raises(Exception):
        np.load(leftovers[0], allow_pickle=False)


# -- the command ---------------------------------------------------------------------------------

def history_of(folder):
    return json.loads((Path(folder) / "history.json").read_text())


def test_mpiexec_minicnn_train_then_resume_on_one_process(tmp_path, capsys):
    out = tmp_path / "run"
    code, output, _ = launch(minicnn_command() + ["train", "--epochs", "1", "--out", out,
                                                  *CLI_ARGS], timeout=300)
    assert code == 0, output[-4000:]
    assert output.count("minicnn train: UNet") == 1 and "2 ranks (mpi)" in output   # rank 0 only
    assert output.count("Epoch 1/1 - ") == 1 and output.count("test Dice") == 1
    assert {"last.npz", "model.npz", "results.json", "history.json"} <= set(os.listdir(out))
    assert not glob.glob(str(out / ".tmp-*"))
    assert cli.main(["train", "--epochs", "2", "--out", str(out), "--resume", *CLI_ARGS]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert len(history_of(out)["loss"]) == 2


def test_one_process_run_resumes_on_two_ranks(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(out), *CLI_ARGS]) == 0
    code, output, _ = launch(minicnn_command() + ["train", "--epochs", "2", "--out", out,
                                                  "--resume", *CLI_ARGS], timeout=300)
    assert code == 0, output[-4000:]
    assert output.count("resumed from") == 1 and "2 ranks (mpi)" in output
    assert len(history_of(out)["loss"]) == 2
