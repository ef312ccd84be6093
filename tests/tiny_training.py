"""Both training phases on a tiny model, in a fresh process; prints a JSON summary on the last line.

    python tests/tiny_training.py [--cpus N] [--distribute none|mirrored] [--without-tensorflow]

Run in its own process because the backend (KERAS_BACKEND) and TensorFlow's logical devices
(--cpus) must be chosen before either is initialised. Writes dvclive and checkpoint folders in the
working directory.
"""
import argparse
import importlib.abc
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SIZE, N = 32, 64


class HideTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by --without-tensorflow)", name=name)
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpus", type=int, default=0, help="split the CPU into this many TensorFlow logical devices")
    parser.add_argument("--distribute", default="none", choices=["none", "mirrored"])
    parser.add_argument("--without-tensorflow", action="store_true", help="run as if TensorFlow were not installed")
    args = parser.parse_args()

    if args.without_tensorflow:
        sys.meta_path.insert(0, HideTensorFlow())

    if args.cpus:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpus)

    import keras

    import synthetic
    from pneumonia import model as model_lib
    from pneumonia import train
    from pneumonia.data import resize_images
    from pneumonia.params import ComputeParams

    arrays = synthetic.make_arrays(0)
    x = resize_images(arrays["train_images"][:N], SIZE, "bilinear")[..., None]
    y = arrays["train_labels"][:N, 0].astype("int32")

    runtime = train.configure(0, ComputeParams(distribute=args.distribute))
    with runtime.scope():
        net = model_lib.build(SIZE, "none", dropout=0.2)
    weights = lambda name: np.concatenate([w.ravel() for w in net.get_layer(name).get_weights()])  # noqa: E731
    before = {name: weights(name) for name in ("logit", "conv5_block3_3_conv")}

    fit_args = dict(epochs=1, patience=1, batch_size=16, runtime=runtime)
    train.train_head(net, (x, y), (x, y), lr=1e-3, live_dir="live/train_head", backup_dir=Path("resume/train_head"),
                     **fit_args)
    train.fine_tune(net, (x, y), (x, y), block="conv5_block1", train_batchnorm=True, cache_dtype="float16",
                    lr=1e-3, live_dir="live/fine_tune", backup_dir=Path("resume/fine_tune"), **fit_args)

    logits = keras.ops.convert_to_numpy(model_lib.logits_model(net).predict(x, verbose=0))
    probabilities = keras.ops.convert_to_numpy(net.predict(x, verbose=0))
    print(json.dumps({
        "backend": keras.backend.backend(),
        "replicas": runtime.strategy.num_replicas_in_sync if runtime.strategy is not None else 1,
        "loss": {phase: json.loads(Path(f"live/{phase}/metrics.json").read_text())["train"]["loss"]
                 for phase in ("train_head", "fine_tune")},
        "moved": {name: float(np.abs(weights(name) - w).max()) for name, w in before.items()},
        "logits_shape": list(logits.shape),
        "logits_finite": bool(np.isfinite(logits).all()),
        "probabilities_shape": list(probabilities.shape),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }))


if __name__ == "__main__":
    main()
