"""Pneumonia probability for new chest X-rays, with the pipeline's trained model and operating point.

    python -m pneumonia.predict xray1.png xray2.jpg [--gradcam DIR] [--json] [--output FILE]

Inputs: any image Pillow reads (PNG, JPEG, ...), DICOM when pydicom is
installed, or a MedMNIST-layout .npz, of which the test split is predicted
(rows named FILE[test/INDEX]; the arrays are loaded with allow_pickle=False).
Colour becomes grayscale; 16-bit PNGs and DICOM pixel data are stretched
linearly from their minimum to their maximum onto 0..255 (no DICOM windowing).
Then the training preprocessing: see to_source_resolution and preprocess.

Output: CSV on stdout (or --output FILE; --json for JSON), one row per image:
file, probability (calibrated as the evaluate stage did, with the scale and
offset from metrics.json: for the share of pneumonia it records as
calibration.prevalence), decision (pneumonia when probability >= threshold,
else normal), threshold, error. A file that cannot be read gets a row with
only `error` filled and one line on stderr; the others are still predicted,
and the exit status is 1. --gradcam DIR writes one image + Grad-CAM overlay
PNG per predicted image, named ROW_STEM.png (ROW: its row number in the output).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pneumonia import params as params_lib
from pneumonia.data import resize_images
from pneumonia.errors import PipelineError
from pneumonia.files import write_text

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
FIELDS = ("file", "probability", "decision", "threshold", "error")
INTERPOLATIONS = typing.get_args(typing.get_type_hints(params_lib.ResizeParams)["interpolation"])


class InputError(Exception):
    """One input file cannot be used; the others still are."""


@dataclass
class Entry:
    name: str  # the file, or FILE[test/INDEX] for an .npz image
    stem: str  # for --gradcam file names
    pixels: np.ndarray | None = None  # (S, S) uint8 at the source resolution S (data.size)
    error: str = ""
    probability: float | None = None


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch 16-bit or float pixels linearly onto 0..255."""
    pixels = pixels.astype("float64")
    low, high = pixels.min(), pixels.max()
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    return np.round((pixels - low) / (high - low) * 255).astype(np.uint8)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise InputError("reading DICOM needs pydicom (pip install pydicom)") from None
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype("float64")
    except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError) as exc:
        raise InputError(f"not a readable DICOM file ({exc})") from None
    if pixels.ndim != 2 or pixels.size == 0:
        raise InputError(f"DICOM pixel data has shape {pixels.shape}; expected one grayscale frame")
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":  # there, high values are dark
        pixels = pixels.max() - pixels
    return _to_uint8(pixels)


def read_gray(path: Path) -> np.ndarray:
    """A 2-D uint8 grayscale array from an image or DICOM file."""
    try:
        if _is_dicom(path):
            return _read_dicom(path)
        with Image.open(path) as image:
            if image.mode in SIXTEEN_BIT_MODES:  # 16-bit X-rays: convert("L") would clip, not scale
                return _to_uint8(np.asarray(image))
            return np.asarray(image.convert("L"))  # convert() decodes, so a truncated file fails here
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise InputError(f"not a readable image ({exc})") from None


def read_npz_test_images(path: Path) -> np.ndarray:
    """test_images (N, H, W) uint8 of a MedMNIST-layout .npz."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "test_images" not in npz.files:
                raise InputError(f"has no test_images array (arrays: {', '.join(npz.files) or 'none'}); "
                                 "expected the MedMNIST layout")
            images = npz["test_images"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"not a readable .npz file ({exc})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or 0 in images.shape:
        raise InputError(
            f"test_images is {images.dtype} {images.shape}; expected (N, H, W) uint8 grayscale, N, H and W at least 1"
        )
    return images


def to_source_resolution(gray: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and downsample to size x size (data.size) with Pillow, as MedMNIST made PneumoniaMNIST.

    The model was trained on images of data.size pixels (28 by default) upsampled to its input size: it has
    never seen finer detail than that. A full-resolution X-ray must therefore go
    through the same bottleneck before the pipeline's own upsampling, or
    it would be a different kind of image from anything in training. MedMNIST does
    not record its downsampling filter; Pillow's bicubic (antialiased when shrinking)
    is used. An input already at that size passes through unchanged.
    """
    height, width = gray.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = gray[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC))


def preprocess(sources: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """(N, S, S) uint8 -> the model's input (N, size, size, 1), as the resize stage does it (kept when S == size)."""
    if sources.shape[1] == size:
        return sources[..., None]
    return resize_images(sources, size, interpolation)[..., None]


def load_entries(path: Path, size: int) -> list[Entry]:
    """One entry per image in `path`; raises InputError when none can be read."""
    if not path.exists():
        raise InputError("no such file")
    if path.is_dir():
        raise InputError("is a directory, not an image file")
    if path.stat().st_size == 0:
        raise InputError("is empty (0 bytes)")
    if path.suffix.lower() == ".npz":
        images = read_npz_test_images(path)
        return [Entry(f"{path}[test/{i}]", f"{path.stem}_test_{i}", to_source_resolution(image, size))
                for i, image in enumerate(images)]
    return [Entry(str(path), path.stem, to_source_resolution(read_gray(path), size))]


def read_preprocessing(model_path: Path, params_path: Path) -> tuple[int, str]:
    """(data.size, resize.interpolation) the model was trained with.

    From the record the stages wrote beside the model (models/model.json for models/model.keras), which states
    how that model was made; params.yaml only for a model without one.
    """
    record_path = Path(model_path).with_suffix(".json")
    if not record_path.is_file():
        loaded = params_lib.load(params_path)
        return loaded.data.size, loaded.resize.interpolation
    try:
        resize = json.loads(record_path.read_text())["resize"]
        return int(resize.get("data.size", 28)), str(resize["resize.interpolation"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise PipelineError(f"model: {record_path} is not the record the fine_tune stage writes; rerun dvc repro "
                            "or remove it to use --params") from None


def read_operating_point(path: Path) -> tuple[float, float, float]:
    """(threshold, scale, offset) that the evaluate stage chose on validation: p = metrics.calibrate(logit, scale, offset).

    The offset already holds the shift to evaluate.prevalence, so nothing else in metrics.json changes p.

    A metrics.json from before platt calibration has only a temperature T: scale 1/T, offset 0.
    """
    try:
        result = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PipelineError(f"metrics: cannot read {path} ({exc.strerror}); run dvc repro or pass --metrics") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"metrics: {path} is not valid JSON; run dvc repro evaluate to rewrite it") from None
    try:
        threshold, calibration = float(result["test"]["threshold"]), result["calibration"]
        if "scale" in calibration:
            scale, offset = float(calibration["scale"]), float(calibration["offset"])
        else:
            scale, offset = 1.0 / float(calibration["temperature"]), 0.0
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise PipelineError(f"metrics: {path} has no test.threshold and calibration (scale and offset, or temperature); "
                            "is it the evaluate stage's metrics.json?") from None
    if not scale > 0:
        raise PipelineError(f"metrics: {path}: the calibration scale is {scale}; it must be positive")
    return threshold, scale, offset


def _decision(probability: float, threshold: float) -> str:
    return "pneumonia" if probability >= threshold else "normal"  # as the evaluate stage counts positives


def _render(entries: list[Entry], threshold: float, as_json: bool) -> str:
    rows = [{"file": e.name, "probability": e.probability,
             "decision": None if e.probability is None else _decision(e.probability, threshold),
             "threshold": threshold, "error": e.error or None} for e in entries]
    if as_json:
        return json.dumps(rows, indent=2) + "\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else (repr(v) if k == "probability" else v) for k, v in row.items()})
    return out.getvalue()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m pneumonia.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="PNG/JPEG/DICOM images or a MedMNIST-layout .npz")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"), help="the trained model (.keras)")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/metrics.json"),
                        help="the evaluate stage's metrics.json: threshold and calibration")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="data.size and resize.interpolation, read only when the model has no record beside it "
                             "(models/model.json for models/model.keras)")
    parser.add_argument("--interpolation", choices=INTERPOLATIONS,
                        help="default: the one the model was trained with (its record, else --params)")
    parser.add_argument("--output", type=Path, help="write here instead of stdout")
    parser.add_argument("--json", action="store_true", help="JSON instead of CSV")
    parser.add_argument("--gradcam", type=Path, metavar="DIR", help="write image + Grad-CAM overlay PNGs here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        source_size, interpolation = read_preprocessing(args.model, args.params)
        interpolation = args.interpolation or interpolation
        threshold, scale, offset = read_operating_point(args.metrics)
        # Keras starts TensorFlow (seconds), and scikit-learn (metrics) takes a second, so they are imported only
        # once the cheap checks have passed.
        from pneumonia import gradcam, metrics, plots
        from pneumonia import model as model_lib

        net = model_lib.load(args.model)
        logit_net = model_lib.logits_model(net, args.model)  # checked before any output is written
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    entries = []
    for path in args.files:
        try:
            entries += load_entries(path, source_size)
        except InputError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            entries.append(Entry(str(path), path.stem, error=str(exc)))

    good = [(row, e) for row, e in enumerate(entries, 1) if e.pixels is not None]
    if good:
        images = preprocess(np.stack([e.pixels for _, e in good]), net.input_shape[1], interpolation)
        logits = logit_net.predict(images, batch_size=32, verbose=0).reshape(-1).astype("float64")
        for (_, entry), probability in zip(good, metrics.calibrate(logits, scale, offset)):
            entry.probability = float(probability)  # printed exactly, so the decision follows from what is shown
        if args.gradcam:
            for (row, entry), image, heatmap in zip(good, images, gradcam.heatmaps(net, images)):
                caption = f"{entry.name}\np={entry.probability:.3f} ({_decision(entry.probability, threshold)})"
                plots.gradcam_grid([image], [heatmap], [caption], "Grad-CAM of the pneumonia logit",
                                   args.gradcam / f"{row:04d}_{entry.stem}.png", pairs_per_row=1)

    text = _render(entries, threshold, args.json)
    if args.output:
        try:
            write_text(args.output, text)
        except OSError as exc:
            print(f"error: cannot write {args.output} ({exc.strerror})", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 1 if any(e.error for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
