"""Seconds per epoch of phase 2 over the whole network, on the real data: what augmentation and op determinism cost.

    python bench/epoch_seconds.py --data ../shared/data/pneumoniamnist.npz [--images N] [--size 64] [--augment]
        [--determinism on|off] [--project DIR]

Trains ResNet-50 from scratch (every layer, BatchNorm learning, as the CPU recipe does) for 2 epochs on the first
N training images resized to --size, and prints each epoch's wall seconds and CPU seconds (all threads of the
process: steadier than wall time on a shared machine) as JSON; the first epoch includes tracing.
--project runs another checkout's code (for before/after comparisons); --determinism sets TensorFlow's op
determinism after the project's own configure(), which turns it on without XLA.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--determinism", choices=["on", "off"], default="on")
    parser.add_argument("--project", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    sys.path.insert(0, args.project)

    import keras
    import numpy as np

    from pneumonia import model as model_lib
    from pneumonia import train
    from pneumonia.data import resize_images
    from pneumonia.params import AugmentParams, ComputeParams

    with np.load(args.data) as npz:
        x = resize_images(npz["train_images"][: args.images], args.size, "bilinear")[..., None]
        y = npz["train_labels"][: args.images, 0].astype("int32")
        val = (resize_images(npz["val_images"][:128], args.size, "bilinear")[..., None],
               npz["val_labels"][:128, 0].astype("int32"))
    runtime = train.configure(42, ComputeParams())
    if args.determinism == "off":
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()
    net = model_lib.build(args.size, "none", 0.2)

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)
            cpu_seconds.append(time.process_time() - self.cpu)

    seconds, cpu_seconds, original_fit = [], [], keras.Model.fit
    keras.Model.fit = lambda self, *a, **kw: original_fit(self, *a, **{**kw, "callbacks": [*kw["callbacks"],
                                                                                           EpochTimes()]})
    with tempfile.TemporaryDirectory() as live:
        train.fine_tune(net, (x, y), val, block="conv1", train_batchnorm=True, cache_dtype="float16",
                        runtime=runtime, augment=AugmentParams(enabled=True) if args.augment else None, lr=1e-3,
                        epochs=2, patience=2, batch_size=32, live_dir=live)
    print(json.dumps({"images": args.images, "size": args.size, "augment": args.augment,
                      "determinism": args.determinism, "project": args.project,
                      "epoch_s": [round(s, 2) for s in seconds], "epoch_cpu_s": [round(s, 2) for s in cpu_seconds]}))


if __name__ == "__main__":
    main()
