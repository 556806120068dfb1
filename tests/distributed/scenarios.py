"""What the multi-process tests train: shared by the MPI worker (mpi_worker.py, run under
mpiexec) and by the one-process references in test_mpi.py, so both build the same thing."""
from __future__ import annotations

import numpy as np

import minicnn as mc
from minicnn import layers as kl
from minicnn.callbacks import Callback
from minicnn.training import batchnorm_layers

SEED = 3
SAMPLES, SIZE, CHANNELS, CLASSES = 16, 6, 2, 3
BATCH, EPOCHS = 8, 2                 # 2 steps an epoch, 4 in all
VALIDATION = 5                       # odd: the two ranks score 2 and 3 samples

# name -> (dtype, batch norm: None | "sync" | "local", optimizer)
CONFIGS = {
    "plain64": ("float64", None, "adam"),
    "sync64": ("float64", "sync", "adam"),
    "local64": ("float64", "local", "adam"),
    "sync32": ("float32", "sync", "sgd"),
    "plain32": ("float32", None, "sgd"),
}


def data(dtype):
    """(x, y) training and (x_val, y_val) validation arrays, the same on every rank."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(SAMPLES + VALIDATION, SIZE, SIZE, CHANNELS)) * 2 + 0.5).astype(dtype)
    y = rng.integers(0, CLASSES, size=(SAMPLES + VALIDATION, SIZE, SIZE))
    return (x[:SAMPLES], y[:SAMPLES]), (x[SAMPLES:], y[SAMPLES:])


def model_for(name):
    """conv 3x3 -> [BN] -> ReLU -> conv 1x1, not compiled."""
    dtype, bn, _ = CONFIGS[name]
    inputs = kl.Input((SIZE, SIZE, CHANNELS), dtype=dtype)
    h = kl.Conv2D(4, 3, padding="same", dtype=dtype)(inputs)
    if bn is not None:
        h = kl.BatchNormalization(synchronized=bn == "sync", momentum=0.9, dtype=dtype)(h)
    h = kl.ReLU(dtype=dtype)(h)
    return mc.Model(inputs, kl.Conv2D(CLASSES, 1, dtype=dtype)(h))


def optimizer_for(name):
    if CONFIGS[name][2] == "adam":
        return mc.optimizers.Adam(1e-2)
    return mc.optimizers.SGD(0.05, momentum=0.9)


def compile_model(model, optimizer):
    model.compile(optimizer=optimizer,
                  loss=mc.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["pixel_accuracy", mc.metrics.MeanIoU(CLASSES)])
    return model


def all_weights(model):
    """Host copies of every weight (trainable and not), in model order."""
    return [w.numpy().copy() for w in model.weights]


class Recorder(Callback):
    """Keeps every weight after every step, and the communicator's call count at each step."""

    def __init__(self, comm=None):
        self.comm, self.steps, self.calls = comm, [], []

    def on_batch_end(self, batch, logs=None):
        self.steps.append(all_weights(self.model))
        if self.comm is not None:
            self.calls.append(self.comm.calls)


def save_steps(path, steps, **extra):
    arrays = {f"step{k}/{i}": w for k, weights in enumerate(steps) for i, w in enumerate(weights)}
    np.savez(path, **arrays, **{k: np.asarray(v) for k, v in extra.items()})


def load_steps(path):
    with np.load(path, allow_pickle=False) as f:
        files = {k: f[k] for k in f.files}
    count = 1 + max(int(k.split("/")[0][4:]) for k in files if k.startswith("step"))
    width = 1 + max(int(k.split("/")[1]) for k in files if k.startswith("step"))
    steps = [[files[f"step{k}/{i}"] for i in range(width)] for k in range(count)]
    return steps, {k: v for k, v in files.items() if not k.startswith("step")}


def micro_batch_reference(name, ranks=2):
    """One process doing what ``ranks`` ranks with unsynchronized BN do: each global batch cut
    into ``ranks`` shares, each share's gradient (and moving-statistics update) from the same
    weights, then their means applied. Returns the weights after every step."""
    mc.seed(SEED)
    (x, y), _ = data(CONFIGS[name][0])
    model = compile_model(model_for(name), optimizer_for(name))
    layers = batchnorm_layers(model)
    steps = []
    for _ in range(EPOCHS):
        order = mc.rng.generator().permutation(len(x))
        for start in range(0, len(x), BATCH):
            index = order[start:start + BATCH]
            before = [(l.moving_mean.data.copy(), l.moving_variance.data.copy()) for l in layers]
            grads, stats = [], []
            for r in range(ranks):
                share = index[len(index) * r // ranks:len(index) * (r + 1) // ranks]
                for layer, (mean, var) in zip(layers, before):
                    layer.moving_mean.data[...], layer.moving_variance.data[...] = mean, var
                loss = model.loss(y[share], model(x[share], training=True))
                model.zero_grad()
                loss.backward()
                grads.append([w.grad.copy() for w in model.trainable_weights])
                stats.append([(l.moving_mean.data.copy(), l.moving_variance.data.copy())
                              for l in layers])
            for i, w in enumerate(model.trainable_weights):
                total = grads[0][i].copy()
                for g in grads[1:]:
                    total += g[i]
                w.grad = total / ranks
            for j, layer in enumerate(layers):
                for k, weight in enumerate((layer.moving_mean, layer.moving_variance)):
                    total = stats[0][j][k].copy()
                    for s in stats[1:]:
                        total += s[j][k]
                    weight.data[...] = total / ranks
            model.optimizer.step(model.trainable_weights)
            steps.append(all_weights(model))
    return steps
