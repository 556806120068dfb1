"""The ``minicnn`` command: train, evaluate, predict, info, gradcheck.

    minicnn train                     # U-Net on the nuclei image, 2 classes, GPU if CuPy sees one
    minicnn train --classes 3         # interior / border: instance F1 and mean AP too
    minicnn evaluate --weights runs/nuclei/model.npz
    minicnn predict image.png --weights runs/nuclei/model.npz --out mask.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from minicnn import distributed
from minicnn.callbacks import Callback


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


# -- data ----------------------------------------------------------------------------------------
def load_task(dataset: str, classes: int, seed: int):
    """(train, val, test) pairs of (images (N, H, W, C), masks (N, H, W)) and the class count."""
    from minicnn import data
    if dataset == "nuclei":
        if classes not in (2, 3):
            raise UsageError(f"--classes must be 2 or 3 for nuclei, got {classes}")
        splits = [data.nuclei(classes, split) for split in ("train", "val", "test")]
        return [(s.image[None], s.mask[None]) for s in splits], classes
    if dataset == "m2nist":
        train = data.m2nist(1200, split="train", seed=seed)
        test = data.m2nist(200, split="test", seed=seed + 1)
        val = (train.image[-200:], train.mask[-200:])
        return [(train.image[:-200], train.mask[:-200]), val, tuple(test)], 11
    if dataset == "shapes":
        images, masks = data.shapes(240, size=64, seed=seed)
        return [(images[:160], masks[:160]), (images[160:200], masks[160:200]),
                (images[200:], masks[200:])], 4
    raise UsageError(f"unknown dataset {dataset!r}: choose nuclei, m2nist or shapes")


def crop_batches(images, masks, crop, batch_size, seed, augment, model):
    """Endless (x, y) training batches of random crops; targets cropped to a 'valid' net's output."""
    from minicnn import data
    augmenter = None
    if augment:
        augmenter = data.ImageDataGenerator(rotation_range=15, zoom_range=0.1,
                                            horizontal_flip=True, vertical_flip=True,
                                            brightness_range=(0.8, 1.2), fill_mode="reflect")
    out = model.output_size(crop)
    margin = (crop - out) // 2
    for x, y in data.random_crops(images, masks, crop, batch_size, seed=seed, augmenter=augmenter):
        yield x, y[:, margin:margin + out, margin:margin + out]


# -- evaluation -----------------------------------------------------------------------------------
def region_scores(model, images, masks, num_classes):
    """Per-class IoU and Dice over whole images (each predicted by overlap-tile)."""
    from minicnn.models.unet import predict_image
    predictions = np.stack([predict_image(model, image).argmax(-1) for image in images])
    iou, dice = [], []
    for c in range(num_classes):
        p, t = predictions == c, masks == c
        inter, total = np.logical_and(p, t).sum(), p.sum() + t.sum()
        union = total - inter
        iou.append(inter / union if union else np.nan)
        dice.append(2 * inter / total if total else np.nan)
    return predictions, np.array(iou), np.array(dice)


def summarise(iou, dice):
    """Foreground means: classes 1.. (background excluded)."""
    return float(np.nanmean(dice[1:])), float(np.nanmean(iou[1:]))


# -- commands -------------------------------------------------------------------------------------
def build_model(args, num_classes):
    from minicnn.models import UNet
    model = UNet(num_classes, base_filters=args.base_filters, depth=args.depth, padding=args.padding)
    try:
        model.output_size(args.crop)
    except ValueError as error:
        raise UsageError(f"--crop {args.crop}: {error}") from None
    return model


class OneHotTargets:
    """Feed integer masks (N, H, W) to a loss that wants one-hot targets (N, H, W, C)."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, y_true, y_pred, sample_weight=None):
        from kernels import backend
        xp = backend.get_array_module(y_pred.data)
        labels = xp.asarray(backend.to_device(getattr(y_true, "data", y_true), y_pred.device))
        one_hot = (labels[..., None] == xp.arange(y_pred.shape[-1])).astype(y_pred.dtype)
        return self.loss(one_hot, y_pred, sample_weight=sample_weight)


def make_loss(name, class_weight=None):
    """The loss of ``--loss``, for softmax logits and integer masks; ``class_weight`` (one
    number per class) weights the cross-entropy terms."""
    from minicnn import losses
    if name == "sparse_ce":
        return losses.SparseCategoricalCrossentropy(from_logits=True, class_weight=class_weight)
    if name == "focal":
        return OneHotTargets(losses.CategoricalFocalCrossentropy(
            from_logits=True, alpha=0.25 if class_weight is None else class_weight))
    if name == "dice":
        return losses.CEDice(from_logits=True, ce_weight=0.0, dice_weight=1.0)
    return losses.CEDice(from_logits=True, class_weight=class_weight)


def parse_class_weight(text, num_classes):
    """'1,1,3' -> [1.0, 1.0, 3.0] (one weight per class), or None."""
    if text is None:
        return None
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--class-weight must be numbers separated by commas, got {text!r}") from None
    if len(weights) != num_classes or min(weights) < 0:
        raise UsageError(f"--class-weight needs {num_classes} non-negative numbers, got {text!r}")
    return weights


def train(args) -> int:
    import minicnn as mc
    from minicnn import io, optimizers, training
    from kernels import backend

    device = backend.check_device(args.device)
    try:
        mc.mixed_precision.set_precision(args.precision)
    except RuntimeError as error:                   # bf16 without ml_dtypes
        raise UsageError(f"--precision {args.precision}: {error}") from None
    if device == "cpu":
        from kernels.fast.runtime import retain_freed_memory
        retain_freed_memory()          # reuse each step's large arrays instead of page-faulting
    engine = "nccl" if device == "gpu" else "mpi"      # under mpiexec: this rank of several
    comm = distributed.init(engine if distributed.launched_size() > 1 else "auto")
    if args.batch_size % comm.size:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the "
                         f"{comm.size} ranks")
    if comm.rank != 0:
        sys.stdout = open(os.devnull, "w")         # rank 0 alone prints
    mc.seed(distributed.rank_seed(args.seed, comm.rank))
    if args.task == "instances":                  # cross-validated nuclei instances: minicnn.crossval
        from minicnn import crossval
        problem = crossval.check(args) or (comm.size > 1 and "--task instances runs in one process")
        if problem:
            raise UsageError(problem)
        args.device = device
        return crossval.run(args)
    if args.folds != 1:
        raise UsageError("--folds needs --task instances")
    (train_set, val_set, test_set), num_classes = load_task(args.dataset, args.classes, args.seed)
    model = build_model(args, num_classes)
    crop = min(args.crop, *train_set[0].shape[1:3])
    optimizer = optimizers.get(args.optimizer, learning_rate=args.lr)
    if comm.size > 1:                  # gradients averaged over the ranks before each step
        optimizer = distributed.DistributedOptimizer(optimizer, comm)
        for layer in training.batchnorm_layers(model):     # statistics over the global batch
            layer.synchronized = args.sync_bn
    model.compile(optimizer=optimizer,
                  loss=make_loss(args.loss, parse_class_weight(args.class_weight, num_classes)), metrics=["pixel_accuracy"])
    model.build((None, crop, crop, train_set[0].shape[-1]))
    model.to(device)
    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, "last.npz"), os.path.join(args.out, "model.npz")
    history, start, best = {}, 0, -1.0
    if args.resume:
        if not os.path.exists(last_path):
            raise UsageError(f"--resume: no checkpoint at {last_path}")
        manifest = io.load_checkpoint(last_path, model)
        start, history = manifest["epoch"], manifest["extra"].get("history", {})
        best = manifest["extra"].get("best", -1.0)
        print(f"resumed from {last_path} after epoch {start}")
    print(f"minicnn train: UNet(num_classes={num_classes}, base_filters={args.base_filters}, "
          f"depth={args.depth}, padding={args.padding!r}), {model.count_params():,} weights, "
          f"{args.dataset} crops {crop}x{crop}, batch {args.batch_size}, device {device}, "
          f"precision {args.precision}"
          + (f", {comm.size} ranks ({comm.backend})" if comm.size > 1 else ""))

    def epoch_batches(epoch):          # each epoch (and rank) its own seeded stream: --resume
        seed = distributed.rank_seed(args.seed * 1000 + epoch, comm.rank)     # repeats it
        return crop_batches(*train_set, crop, args.batch_size // comm.size, seed=seed,
                            augment=args.augment, model=model)

    validation = RegionValidation(train_set, val_set, num_classes, crop, args, best, history)
    callbacks = [validation] + tensorboard_callback(args, val_set, crop)
    started = time.perf_counter()
    model.fit(epoch_batches, epochs=args.epochs, initial_epoch=start,
              steps_per_epoch=args.steps_per_epoch, callbacks=callbacks)
    if comm.rank != 0:                 # the rest is rank 0's: one model, one report
        return 0
    print(f"trained in {time.perf_counter() - started:.0f} s; best validation Dice "
          f"{validation.best:.4f}")
    write_history(args.out, validation.history)
    best_model = io.load_model(best_path).to(device)
    with distributed.unsynchronized():
        recalibrate(best_model, train_set, crop, args)
    io.save_model(best_model, best_path)
    report(best_model, test_set, num_classes, args)
    return 0


class RegionValidation(Callback):
    """After each epoch: re-estimate the batch-norm statistics, score the validation region,
    keep the best model by validation Dice (model.npz) and a checkpoint to resume (last.npz)."""

    def __init__(self, train_set, val_set, num_classes, crop, args, best, history):
        self.train_set, self.val_set, self.num_classes = train_set, val_set, num_classes
        self.crop, self.args, self.best, self.history = crop, args, best, history

    def on_epoch_end(self, epoch, logs):
        from minicnn import io
        with distributed.unsynchronized():         # the same crops on every rank
            recalibrate(self.model, self.train_set, self.crop, self.args)
        if distributed.world().rank != 0:          # rank 0 alone scores and writes
            return
        _, iou, dice = region_scores(self.model, *self.val_set, self.num_classes)
        logs["val_dice"], logs["val_iou"] = summarise(iou, dice)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        if logs["val_dice"] > self.best:
            self.best = logs["val_dice"]
            io.save_model(self.model, os.path.join(self.args.out, "model.npz"))
        io.save_checkpoint(os.path.join(self.args.out, "last.npz"), self.model, epoch + 1,
                           extra={"history": self.history, "best": self.best})


def tensorboard_callback(args, val_set, crop, count=3) -> list:
    """[TensorBoard(--tensorboard DIR)] with up to ``count`` validation crops drawn each epoch,
    or [] without the flag."""
    if args.tensorboard is None:
        return []
    from minicnn.callbacks import TensorBoard
    images, masks = val_set
    corners = [(i, c) for i in range(len(images))
               for c in range(0, images.shape[2] - crop + 1, crop)][:count]
    crops = (np.stack([images[i, :crop, c:c + crop] for i, c in corners]),
             np.stack([masks[i, :crop, c:c + crop] for i, c in corners]))
    try:
        return [TensorBoard(args.tensorboard, prediction_images=crops)]
    except ImportError as error:
        raise UsageError(f"--tensorboard: {error}") from None


def recalibrate(model, train_set, crop, args, batches=8):
    """Batch-norm population statistics of the current weights, from fresh training crops."""
    from minicnn import data, training
    stream = data.random_crops(*train_set, crop, args.batch_size, seed=args.seed + 7)
    training.recompute_batchnorm_statistics(model, (next(stream)[0] for _ in range(batches)))


def report(model, test_set, num_classes, args):
    """Print the test scores and draw the pictures."""
    predictions, iou, dice = region_scores(model, *test_set, num_classes)
    fg_dice, fg_iou = summarise(iou, dice)
    results = {"test_dice": fg_dice, "test_iou": fg_iou,
               "per_class_iou": [None if np.isnan(v) else float(v) for v in iou]}
    print(f"test Dice {fg_dice:.4f}  test IoU {fg_iou:.4f}  (foreground)")
    if args.dataset != "nuclei" or num_classes > 3:
        print("per-class IoU: " + "  ".join(f"{c}: {v:.3f}" for c, v in enumerate(iou)))
    if args.dataset == "nuclei":
        from minicnn import data, segmentation
        truth = data.nuclei_instances("test")
        if num_classes == 3:
            found = segmentation.instances(predictions[0])
        else:
            found = segmentation.instances_from_two_class(predictions[0])
        results["instance_f1@0.5"] = segmentation.f1_at(truth, found, 0.5)
        results["instance_mean_ap"] = segmentation.mean_average_precision(truth, found)
        print(f"instances: F1@0.5 {results['instance_f1@0.5']:.4f}  "
              f"mean AP (IoU 0.5..0.95) {results['instance_mean_ap']:.4f}")
    write_json(os.path.join(args.out, "results.json"), results)
    draw(model, test_set, predictions, args)


def write_json(path, payload):
    from minicnn.io import write_text_atomic
    write_text_atomic(path, json.dumps(payload, indent=2))


def write_history(folder, history):
    from minicnn.io import write_text_atomic
    write_json(os.path.join(folder, "history.json"), history)
    keys = list(history)
    rows = [",".join(["epoch"] + keys)]
    for i in range(len(history[keys[0]]) if keys else 0):
        rows.append(",".join([str(i + 1)] + [f"{history[k][i]:.6g}" for k in keys]))
    write_text_atomic(os.path.join(folder, "history.csv"), "\n".join(rows) + "\n")


def draw(model, test_set, predictions, args):
    from minicnn import visualize
    if not visualize.matplotlib_available():
        print('pictures skipped: matplotlib is not installed (pip install "minicnn[plot]")')
        return
    with open(os.path.join(args.out, "history.json")) as handle:
        history = json.load(handle)
    visualize.save_training_curves(history, os.path.join(args.out, "curves.png"))
    visualize.save_predictions(test_set[0], test_set[1], predictions,
                               os.path.join(args.out, "predictions.png"))
    print(f"wrote {args.out}/curves.png and {args.out}/predictions.png")


def evaluate(args) -> int:
    model = load_for_cli(args.weights)
    (_, _, test_set), num_classes = load_task(args.dataset, args.classes, args.seed)
    if model.num_classes != num_classes:
        raise UsageError(f"--weights {args.weights}: the model has {model.num_classes} classes, "
                         f"{args.dataset} with --classes {args.classes} has {num_classes}")
    _, iou, dice = region_scores(model, *test_set, num_classes)
    fg_dice, fg_iou = summarise(iou, dice)
    print(f"test Dice {fg_dice:.4f}  test IoU {fg_iou:.4f}  (foreground)")
    print("per-class IoU: " + "  ".join(f"{c}: {v:.3f}" for c, v in enumerate(iou)))
    return 0


def load_for_cli(path):
    from minicnn import io
    if not os.path.exists(path):
        raise UsageError(f"--weights: no such file: {path}")
    try:
        return io.load_model(path)
    except ValueError as error:
        raise UsageError(f"--weights {path}: {str(error).splitlines()[0]}") from None


def predict(args) -> int:
    from minicnn.models.unet import predict_image
    model = load_for_cli(args.weights)
    if not os.path.exists(args.image):
        raise UsageError(f"no such image: {args.image}")
    if args.image.endswith(".npy"):
        image = np.load(args.image, allow_pickle=False)
    else:
        from minicnn import visualize
        image = visualize.read_image(args.image)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.max() > 1.0:
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
    channels = model.built_input_shape[-1]
    if image.shape[-1] != channels:
        if channels == 1:
            image = image[..., :3].mean(axis=-1, keepdims=True)
        else:
            raise UsageError(f"{args.image}: the model takes {channels} channels, the image has "
                             f"{image.shape[-1]}")
    mask = predict_image(model, image).argmax(-1).astype(np.uint8)
    if args.out.endswith(".npy"):
        np.save(args.out, mask)
    else:
        from minicnn import visualize
        visualize.save_mask(mask, args.out, model.num_classes)
    print(f"wrote {args.out}: {mask.shape[0]}x{mask.shape[1]} mask, classes "
          f"{sorted(int(c) for c in np.unique(mask))}")
    return 0


def info(args) -> int:
    import platform
    import scipy
    import minicnn
    from kernels import backend
    print(f"minicnn {minicnn.__version__}, Python {platform.python_version()}, "
          f"NumPy {np.__version__}, SciPy {scipy.__version__}")
    try:
        from threadpoolctl import threadpool_info
        for pool in threadpool_info():
            print(f"BLAS: {pool.get('internal_api')} {pool.get('version')} "
                  f"({pool.get('num_threads')} threads, {pool.get('architecture')})")
    except ImportError:
        config = np.show_config(mode="dicts") if np.lib.NumpyVersion(np.__version__) >= "1.26.0" else {}
        blas = config.get("Build Dependencies", {}).get("blas", {})
        print(f"BLAS: {blas.get('name', 'unknown')} {blas.get('version', '')}")
    print(f"CPU cores: {os.cpu_count()}")
    if backend.gpu_available():
        cp = backend.cupy_module()
        for i in range(cp.cuda.runtime.getDeviceCount()):
            name = cp.cuda.runtime.getDeviceProperties(i)["name"].decode()
            print(f"GPU {i}: {name} (CuPy {cp.__version__})")
    else:
        try:
            backend.cupy_module()
        except RuntimeError as error:
            print(f"GPU: none ({str(error).splitlines()[0]})")
    return 0


def gradcheck_command(args) -> int:
    from minicnn.checks import run_all_gradchecks
    failures = run_all_gradchecks(print_fn=print)
    return 1 if failures else 0


def make_parser() -> Parser:
    parser = Parser(prog="minicnn", description="Train and check convolutional networks.")
    commands = parser.add_subparsers(dest="command", parser_class=Parser)
    run = commands.add_parser("train", help="train a U-Net on a built-in data set")
    run.add_argument("--dataset", default="nuclei", choices=["nuclei", "m2nist", "shapes"])
    run.add_argument("--classes", type=int, default=2, help="nuclei: 2 or 3")
    run.add_argument("--epochs", type=int, default=8)
    run.add_argument("--steps-per-epoch", type=int, default=100)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--crop", type=int, default=64)
    run.add_argument("--base-filters", type=int, default=16)
    run.add_argument("--depth", type=int, default=3)
    run.add_argument("--padding", default="same", choices=["same", "valid"])
    run.add_argument("--loss", default="sparse_ce", choices=["sparse_ce", "focal", "dice", "ce_dice"])
    run.add_argument("--class-weight", default=None,
                     help="one loss weight per class, e.g. 1,1,3 to stress nucleus borders")
    run.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "rmsprop"])
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    run.add_argument("--precision", default="float32", choices=["float32", "tf32", "bf16", "fp16"],
                     help="float32; tf32: float32 with TF32 GPU products; bf16 / fp16: the "
                          "mixed_bfloat16 / mixed_float16 policy (fp16 with loss scaling)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default="runs/minicnn")
    run.add_argument("--resume", action="store_true", help="continue from OUT/last.npz")
    run.add_argument("--tensorboard", metavar="DIR", default=None,
                     help="write TensorBoard logs (scalars, validation predictions) to DIR")
    run.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                     help="under mpiexec: batch-norm statistics over the global batch")
    run.add_argument("--task", default="semantic", choices=["semantic", "instances"],
                     help="instances: nuclei instances scored per nucleus (minicnn.crossval)")
    inst = run.add_argument_group("--task instances (see minicnn/crossval.py)")
    inst.add_argument("--folds", type=int, default=1,
                      help="cross-validation over this many bands of rows (1: test rows 448-511)")
    inst.add_argument("--head", default="border-distance",
                      choices=["border-distance", "border", "distance", "mask"],
                      help="3 classes + distance regression, 3 classes, 2 + distance, 2 classes")
    inst.add_argument("--border-weight", type=float, default=10.0,
                      help="w0 of the U-Net weight map (0: plain cross-entropy)")
    inst.add_argument("--border-sigma", type=float, default=5.0)
    inst.add_argument("--postprocess", default=None, choices=["watershed", "grow", "components"],
                      help="default: grow for --head border, watershed for distance, components for mask")
    inst.add_argument("--flips", type=int, default=8, choices=[1, 2, 4, 8],
                      help="test-time flips / transposes averaged")
    inst.add_argument("--tune", action=argparse.BooleanOptionalAction, default=False,
                      help="choose the post-processing thresholds on the validation band")
    inst.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    ev = commands.add_parser("evaluate", help="test-region scores of saved weights")
    ev.add_argument("--weights", required=True)
    ev.add_argument("--dataset", default="nuclei", choices=["nuclei", "m2nist", "shapes"])
    ev.add_argument("--classes", type=int, default=2)
    ev.add_argument("--seed", type=int, default=0)
    pr = commands.add_parser("predict", help="segment an image (PNG or .npy)")
    pr.add_argument("image")
    pr.add_argument("--weights", required=True)
    pr.add_argument("--out", default="mask.png")
    commands.add_parser("info", help="versions, BLAS, devices")
    commands.add_parser("gradcheck", help="check the gradient of every built-in kernel")
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "train":
            for name in ("epochs", "steps_per_epoch", "batch_size", "crop", "base_filters", "depth",
                         "folds"):
                if getattr(args, name) < 1:
                    raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        handler = {"train": train, "evaluate": evaluate, "predict": predict, "info": info,
                   "gradcheck": gradcheck_command}[args.command]
        return distributed.exit_status(handler(args))
    except UsageError as error:
        print(str(error), file=sys.stderr)
        return distributed.exit_status(2)
    except RuntimeError as error:
        if "device 'gpu'" in str(error):
            print(f"minicnn: {str(error).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return distributed.exit_status(130)


if __name__ == "__main__":
    sys.exit(main())
