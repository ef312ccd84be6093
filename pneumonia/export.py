"""The trained model as a TensorFlow SavedModel for serving (TF Serving, tf.saved_model.load), with its operating point.

    python -m pneumonia.export [--model models/model.keras] [--metrics metrics/metrics.json] [--output models/serving]

One signature, `serve` (also `serving_default`). Input `pixels`: uint8 (N, S, S, 1) at the model's input size S
(image_size), i.e. images as the resize stage writes them; a new X-ray first goes through pneumonia.predict's
preprocessing (center crop, down to data.size, up to S). Outputs, one value per image:

    probability              float32  the model's own sigmoid output, as the .keras model gives it
    calibrated_probability   float64  sigmoid(scale * logit + offset), as pneumonia.predict and the evaluate stage
    pneumonia                bool     calibrated_probability >= threshold, the evaluate stage's operating point

scale, offset and threshold are read from metrics.json when exporting and written into the graph as constants:
export again after the evaluate stage reruns. The SavedModel is written to a temporary folder beside --output
and renamed into place at the end, replacing an earlier export (a folder with saved_model.pb) and nothing else.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from pneumonia.errors import PipelineError
from pneumonia.files import read_operating_point, read_tta

SIGNATURE = "serve"


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so a killed export removes its temporary folder too


def _check_output(output: Path) -> None:
    if output.exists() and not (output / "saved_model.pb").is_file():
        raise PipelineError(f"export: {output} exists and is not an earlier export (no saved_model.pb); "
                            "remove it or choose another --output")


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished export to `output`; an earlier export there is removed only once the new one is in place."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        os.replace(output, old / output.name)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old)


def export(model_path: Path, metrics_path: Path, output: Path) -> int:
    """Write the SavedModel; returns the input size S."""
    threshold, scale, offset = read_operating_point(metrics_path)
    if (views := read_tta(metrics_path)["views"]) > 1:  # the constants hold only for logits averaged over the views
        raise PipelineError(f"export: {metrics_path} was scored with test-time augmentation ({views} views), which the "
                            "SavedModel does not do; export a run with evaluate.tta 1 (dvc exp run -S evaluate.tta=1)")
    _check_output(output)
    # Keras starts TensorFlow (seconds), so it is imported only once the cheap checks have passed.
    import keras

    if keras.backend.backend() != "tensorflow":
        raise PipelineError(f"export: a SavedModel is a TensorFlow graph; run with KERAS_BACKEND=tensorflow, "
                            f"not {keras.backend.backend()}")
    import tensorflow as tf

    from pneumonia import model as model_lib

    net = model_lib.load(model_path)
    logit = model_lib.logits_model(net, model_path).output
    both = keras.Model(net.input, [net.output, logit])
    size = net.input_shape[1]

    def serve(pixels):
        probability, logits = both(tf.cast(pixels, tf.float32), training=False)
        calibrated = tf.sigmoid(scale * tf.cast(logits[:, 0], tf.float64) + offset)  # float64, as predict computes it
        return {"probability": tf.cast(probability[:, 0], tf.float32), "calibrated_probability": calibrated,
                "pneumonia": calibrated >= threshold}

    archive = keras.export.ExportArchive()
    archive.track(both)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[tf.TensorSpec((None, size, size, 1), tf.uint8, "pixels")])
    tmp = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        archive.write_out(tmp / "export", verbose=False)
        _replace(tmp / "export", output)
    except OSError as exc:
        raise PipelineError(f"export: cannot write {output} ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumonia.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"), help="the trained model (.keras)")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/metrics.json"),
                        help="the evaluate stage's metrics.json: threshold and calibration")
    parser.add_argument("--output", type=Path, default=Path("models/serving"), help="the SavedModel folder")
    args = parser.parse_args(argv)
    try:
        size = export(args.model, args.metrics, args.output)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: export interrupted; {args.output} was left as it was", file=sys.stderr)
        return 130
    print(f"export: wrote {args.output} (signature {SIGNATURE}: uint8 pixels (N, {size}, {size}, 1) -> "
          "probability, calibrated_probability, pneumonia)")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
