"""The rank side of the multi-process tests: ``mpiexec -n 2 python mpi_worker.py SCENARIO OUT``.

Each scenario writes what it saw into OUT (one file per rank); test_mpi.py launches it and
checks those files against one-process references. Scenarios:
  train       every config of scenarios.CONFIGS: 2 epochs of fit, weights after every step,
              logs, collective counts; a checkpoint after epoch 1; resume of OUT/one_rank.npz
              (written by one process) for epoch 2; NCCL's unique-id broadcast (fake NCCL)
  raise       rank 1 raises inside its 3rd step
  exit        rank 1 ends with exit_status(3) while rank 0 waits in a barrier
  checkpoint  rank 1 dies while rank 0 is half-way through writing a checkpoint
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import minicnn as mc
from minicnn import distributed, io
from minicnn.callbacks import Callback, ModelCheckpoint

import fakes
import scenarios as S


def train(comm, out):
    for name in S.CONFIGS:
        mc.distributed.seed(S.SEED, comm)
        (x, y), validation = S.data(S.CONFIGS[name][0])
        model = S.compile_model(S.model_for(name),
                                distributed.DistributedOptimizer(S.optimizer_for(name), comm))
        recorder = S.Recorder(comm)
        checkpoint = ModelCheckpoint(os.path.join(out, f"{name}_epoch{{epoch}}.npz"),
                                     save_best_only=False)
        history = model.fit(x, y, batch_size=S.BATCH, epochs=S.EPOCHS, verbose=0,
                            validation_data=validation, callbacks=[recorder, checkpoint])
        S.save_steps(os.path.join(out, f"{name}_rank{comm.rank}.npz"), recorder.steps,
                     calls=recorder.calls)
        with open(os.path.join(out, f"{name}_rank{comm.rank}.json"), "w") as handle:
            json.dump(history.history, handle)

    # resume, on 2 ranks, epoch 2 of a run whose epoch 1 one process did
    name = "sync64"
    mc.distributed.seed(S.SEED + 1, comm)       # other initial weights: the checkpoint decides
    (x, y), _ = S.data("float64")
    model = S.compile_model(S.model_for(name),
                            distributed.DistributedOptimizer(S.optimizer_for(name), comm))
    manifest = io.load_checkpoint(os.path.join(out, "one_rank.npz"), model)
    model.fit(x, y, batch_size=S.BATCH, epochs=S.EPOCHS, initial_epoch=manifest["epoch"],
              verbose=0)
    S.save_steps(os.path.join(out, f"resumed_rank{comm.rank}.npz"), [S.all_weights(model)])

    # NCCL's bootstrap over MPI: rank 0's id reaches every rank
    nccl, cupy = fakes.fake_nccl(), fakes.fake_cupy(devices=1)
    nccl_comm = distributed.NCCLCommunicator(comm, nccl=nccl, cupy=cupy)
    (_, _, unique_id, rank), = [c for c in nccl.calls if c[0] == "init"]
    drawn = [c for c in nccl.calls if c[0] == "get_unique_id"]
    with open(os.path.join(out, f"nccl_rank{comm.rank}.json"), "w") as handle:
        json.dump({"id": list(unique_id), "rank": rank, "size": nccl_comm.size,
                   "drew_id": len(drawn), "device": cupy.used}, handle)


def raise_mid_step(comm, out):
    (x, y), _ = S.data("float64")
    model = S.compile_model(S.model_for("sync64"),
                            distributed.DistributedOptimizer(S.optimizer_for("sync64"), comm))
    steps = [0]
    loss = model.loss

    def failing_loss(y_true, y_pred, sample_weight=None):
        steps[0] += 1
        if comm.rank == 1 and steps[0] == 3:
            with open(os.path.join(out, "raised_at"), "w") as handle:
                handle.write(repr(time.time()))
            raise ValueError("rank 1: a bad batch at step 3")
        return loss(y_true, y_pred, sample_weight=sample_weight)
    model.loss = failing_loss
    model.fit(x, y, batch_size=S.BATCH, epochs=50, verbose=0)


def exit_early(comm, out):
    if comm.rank == 1:
        with open(os.path.join(out, "raised_at"), "w") as handle:
            handle.write(repr(time.time()))
        sys.exit(distributed.exit_status(3))
    comm.barrier()


class DieAtEpoch(Callback):
    def __init__(self, comm, out, epoch):
        self.comm, self.out, self.epoch = comm, out, epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == 1 and self.comm.rank == 0:     # the checkpoint of epoch 1 is written
            S.save_steps(os.path.join(self.out, "epoch1.npz"), [S.all_weights(self.model)])
        if epoch + 1 == self.epoch and self.comm.rank == 1:
            time.sleep(2)                               # rank 0 is inside its slow write
            with open(os.path.join(self.out, "raised_at"), "w") as handle:
                handle.write(repr(time.time()))
            raise RuntimeError("rank 1: out of memory (simulated) after epoch 2")


def die_while_rank0_writes(comm, out):
    saves = [0]
    savez = np.savez

    def slow_savez(stream, **arrays):            # the second checkpoint stalls half-way
        if not hasattr(stream, "write"):         # a path: not write_npz_atomic's stream
            return savez(stream, **arrays)
        saves[0] += 1
        if saves[0] < 2:
            return savez(stream, **arrays)
        stream.write(b"PK\x03\x04 half a zip archive")
        stream.flush()
        time.sleep(120)
    if comm.rank == 0:
        np.savez = slow_savez
    (x, y), _ = S.data("float64")
    model = S.compile_model(S.model_for("sync64"),
                            distributed.DistributedOptimizer(S.optimizer_for("sync64"), comm))
    model.fit(x, y, batch_size=S.BATCH, epochs=3, verbose=0,
              callbacks=[ModelCheckpoint(os.path.join(out, "last.npz"), save_best_only=False),
                         DieAtEpoch(comm, out, epoch=2)])


if __name__ == "__main__":
    scenario, folder = sys.argv[1], sys.argv[2]
    world = distributed.init("mpi")
    {"train": train, "raise": raise_mid_step, "exit": exit_early,
     "checkpoint": die_while_rank0_writes}[scenario](world, folder)
