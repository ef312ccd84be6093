"""The training paths on a tiny ResNet-50 run, in a fresh process; prints a JSON summary on the last line.

    python tests/tiny_training.py [--cpus N] [--distribute none|mirrored] [--mixed-precision on|off]
        [--jit-compile auto|on|off] [--paths head,cached,whole] [--snapshot DIR | --resume DIR]
        [--without-tensorflow] [--mixup ALPHA]

Paths: `head` is phase 1 on cached pooled features; `cached` is phase 2 from conv5_block1 on a float16 cache
of the frozen prefix (the ImageNet default); `whole` is phase 2 of the whole network with on-the-fly
augmentation. Each path trains a freshly seeded model for 2 epochs on 32 images of 32 px (batch 16).
--snapshot DIR keeps the checkpoint each path wrote after epoch 1; --resume DIR starts each path from that
checkpoint, as a rerun after a kill does. The final weights go to weights.npz in the working directory.

Run in its own process because the backend (KERAS_BACKEND) and TensorFlow's logical devices (--cpus) must be
chosen before either is initialised.
"""
import argparse
import contextlib
import importlib.abc
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SIZE, N, BATCH, EPOCHS = 32, 32, 16, 2


class HideTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by --without-tensorflow)", name=name)
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpus", type=int, default=0, help="split the CPU into this many TensorFlow logical devices")
    parser.add_argument("--distribute", default="none", choices=["none", "mirrored"])
    parser.add_argument("--mixed-precision", default="off", choices=["on", "off"])
    parser.add_argument("--jit-compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--paths", default="head,cached,whole")
    parser.add_argument("--snapshot", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--without-tensorflow", action="store_true", help="run as if TensorFlow were not installed")
    parser.add_argument("--mixup", type=float, default=0.0, help="MixUp's alpha for every path (0: off)")
    args = parser.parse_args()

    if args.without_tensorflow:
        sys.meta_path.insert(0, HideTensorFlow())
    os.environ["PNEUMONIA_CHECKPOINT_EVERY_S"] = "0"  # a checkpoint after every epoch but the last

    import pneumonia  # noqa: F401  (quiet TensorFlow import)

    if args.cpus:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpus)

    import keras

    import synthetic
    from pneumonia import model as model_lib
    from pneumonia import train
    from pneumonia.data import resize_images
    from pneumonia.params import AugmentParams, ComputeParams

    arrays = synthetic.make_arrays(0)
    x = resize_images(arrays["train_images"][: N + BATCH], SIZE, "bilinear")[..., None]
    y = arrays["train_labels"][: N + BATCH, 0].astype("int32")
    train_split, val_split = (x[:N], y[:N]), (x[N:], y[N:])

    runtime = train.configure(0, ComputeParams(mixed_precision=args.mixed_precision, jit_compile=args.jit_compile,
                                               distribute=args.distribute))

    class KeepEpochOne(keras.callbacks.Callback):
        """Copies the checkpoint written after epoch 1 (the fit deletes it when it completes)."""

        def __init__(self, source, target):
            super().__init__()
            self.source, self.target = source, target

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0 and self.target is not None:
                shutil.copytree(self.source, self.target)

    summary, weights, stdout = {"backend": keras.backend.backend(), "replicas": runtime.replicas}, {}, io.StringIO()
    for index, path in enumerate(args.paths.split(",")):
        keras.backend.clear_session()  # layer names, and so variable paths, as in a fresh stage process
        keras.utils.set_random_seed(100 + index)  # each path starts as in a fresh run, in both processes
        with runtime.scope():
            net = model_lib.build(SIZE, "none", dropout=0.2)
        conv = net.get_layer("conv5_block3_3_conv").get_weights()[0].copy()
        backup = Path("resume") / path
        shutil.rmtree(backup, ignore_errors=True)
        if args.resume is not None:
            shutil.copytree(args.resume / path, backup)
        keep = KeepEpochOne(backup, args.snapshot / path if args.snapshot else None)
        fit = dict(lr=1e-3, epochs=EPOCHS, patience=EPOCHS, batch_size=BATCH, runtime=runtime, keep="last",
                   live_dir=f"live/{path}", backup_dir=backup, mixup=args.mixup)
        original_fit = keras.Model.fit
        keras.Model.fit = lambda self, *a, **kw: original_fit(self, *a, **{**kw, "callbacks": [*kw["callbacks"], keep]})
        try:
            with contextlib.redirect_stdout(stdout):
                if path == "head":
                    train.train_head(net, train_split, val_split, **fit)
                elif path == "cached":
                    train.fine_tune(net, train_split, val_split, block="conv5_block1", train_batchnorm=False,
                                    cache_dtype="float16", **fit)
                else:
                    train.fine_tune(net, train_split, val_split, block="conv1", train_batchnorm=True,
                                    cache_dtype="float16", augment=AugmentParams(enabled=True), **fit)
        finally:
            keras.Model.fit = original_fit
        train.save(net, f"{path}.keras")
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")  # as evaluate and predict load it, in a process of their own
        saved = model_lib.load(f"{path}.keras")
        keras.config.set_dtype_policy(policy)
        logits = keras.ops.convert_to_numpy(model_lib.logits_model(saved).predict(x[:4], verbose=0))
        weights |= {f"{path}/{i}": w for i, w in enumerate(net.get_weights())}
        summary[path] = {
            "loss": json.loads(Path(f"live/{path}/metrics.json").read_text())["train"]["loss"],
            "logit_moved": float(np.abs(net.get_layer("logit").get_weights()[0]).sum()) > 0,
            "conv5_moved": float(np.abs(net.get_layer("conv5_block3_3_conv").get_weights()[0] - conv).max()),
            "saved_logits_dtype": str(logits.dtype),
            "saved_policies": sorted({layer.dtype_policy.name for layer in saved.layers}),
        }
    np.savez("weights.npz", **weights)
    summary["stdout"] = stdout.getvalue()
    summary["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
