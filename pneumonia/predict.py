"""Pneumonia probability for new chest X-rays, with the pipeline's trained model and operating point.

    python -m pneumonia.predict xray1.png xray2.jpg [--gradcam DIR] [--json] [--output FILE]

Inputs: any image Pillow reads (PNG, JPEG, ...; turned upright by its EXIF
orientation), single-frame grayscale DICOM, or a MedMNIST-layout .npz, of which
the test split is predicted (rows named FILE[test/INDEX]; the arrays are loaded
with allow_pickle=False). Colour becomes grayscale; 16-bit PNGs are stretched
linearly from their minimum to their maximum onto 0..255. DICOM goes through its
grayscale pipeline (see _read_dicom): Rescale Slope/Intercept or Modality LUT,
then its VOI LUT or window (else the 0.5th..99.5th percentiles), inverted for
MONOCHROME1 or Presentation LUT Shape INVERSE, onto 0..255 (0 dark).
Compressed DICOM: pydicom decodes RLE, and baseline JPEG and JPEG 2000 with Pillow;
for other transfer syntaxes the error row names the decoders to install.
Then the training preprocessing: see to_source_resolution and preprocess.

Output: CSV on stdout (or --output FILE; --json for JSON), one row per image:
file, probability (calibrated as the evaluate stage did, with the scale and
offset from metrics.json: for the share of pneumonia it records as
calibration.prevalence; of the mean logit over the test-time augmentation
views it records as tta), decision (pneumonia when probability >= threshold,
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
from PIL import Image, ImageOps

from pneumonia import params as params_lib
from pneumonia.data import resize_images
from pneumonia.errors import PipelineError
from pneumonia.files import read_operating_point, read_tta, write_text

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


def _to_uint8(pixels: np.ndarray, low: float | None = None, high: float | None = None,
              invert: bool = False) -> np.ndarray:
    """Map low..high (default: the minimum and maximum) linearly onto 0..255, clipping outside; invert: 255..0."""
    pixels = pixels.astype("float64")
    low = pixels.min() if low is None else low
    high = pixels.max() if high is None else high
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    unit = np.clip((pixels - low) / (high - low), 0, 1)
    return np.round((1 - unit if invert else unit) * 255).astype(np.uint8)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__  # pydicom's messages can span lines


def _decode_error(syntax, exc: Exception) -> InputError:
    """Compressed pixel data pydicom could not decode: the decoders it would use for that syntax, or converting it."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(syntax)
    reason = f"decoding failed ({_one_line(exc)})" if decoder.is_available else "needs a decoder, and none is installed"
    missing = "; ".join(decoder.missing_dependencies)  # pydicom's own, e.g. "pylibjpeg - requires ..."
    pip_name = " (gdcm is pip install python-gdcm)" if "gdcm" in missing else ""
    install = f"install one of: {missing}{pip_name}, or " if missing else ""
    return InputError(f"compressed transfer syntax {syntax.name} ({syntax}): {reason}; {install}"
                      "convert the file to uncompressed (e.g. gdcmconv --raw IN OUT)")


def _read_dicom(path: Path) -> np.ndarray:
    """The DICOM grayscale pipeline (PS3.4 N.2.1) with pydicom's own functions, onto 0..255 where 0 is dark.

    Stored values -> Modality LUT (Rescale Slope/Intercept) -> VOI LUT or window, whose output range is mapped
    onto 0..255 so values outside the window clip. A file without either is clipped at its 0.5th and 99.5th
    percentiles instead: a min-max stretch would be set by collimator edges and burned-in text, not the anatomy.
    Then the Presentation LUT: MONOCHROME1 (high values dark) and Presentation LUT Shape INVERSE each mean one
    inversion, also together: the standard has MONOCHROME1 files say INVERSE (PS3.3 C.8.11.7), the same inversion.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise InputError("reading DICOM needs pydicom (pip install -r requirements.txt)") from None
    try:
        dataset = pydicom.dcmread(path)
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        try:
            stored = dataset.pixel_array
        except Exception as exc:
            if syntax is None or not syntax.is_compressed:
                raise
            raise _decode_error(syntax, exc) from None
        if stored.ndim != 2 or stored.size == 0:
            raise InputError(f"DICOM pixel data has shape {stored.shape}; expected one grayscale frame")
        values = apply_modality_lut(stored, dataset)
        if dataset.get("VOILUTSequence") or None not in (dataset.get("WindowCenter"), dataset.get("WindowWidth")):
            # The VOI output range (pydicom's window spans the BitsStored range, a LUT its entries): what the
            # lowest and highest storable values map to.
            bits = dataset.BitsStored
            lowest = -(1 << bits - 1) if dataset.PixelRepresentation else 0
            span = apply_voi_lut(apply_modality_lut(np.array([lowest, lowest + (1 << bits) - 1]), dataset), dataset)
            values, low, high = apply_voi_lut(values, dataset), span.min(), span.max()
        else:
            low, high = np.percentile(values, [0.5, 99.5])
        invert = (dataset.PhotometricInterpretation == "MONOCHROME1"
                  or str(dataset.get("PresentationLUTShape", "")).strip().upper() == "INVERSE")
        return _to_uint8(values, low, high, invert)
    except InputError:
        raise
    except Exception as exc:  # pydicom raises many types for one bad file; it must not abort the others
        raise InputError(f"not a readable DICOM file ({type(exc).__name__}: {_one_line(exc)})") from None


def read_gray(path: Path) -> np.ndarray:
    """A 2-D uint8 grayscale array from an image or DICOM file."""
    try:
        if _is_dicom(path):
            return _read_dicom(path)
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # a camera JPEG may be stored sideways; this also decodes it
            if image.mode in SIXTEEN_BIT_MODES:  # 16-bit X-rays: convert("L") would clip, not scale
                return _to_uint8(np.asarray(image))
            return np.asarray(image.convert("L"))
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
        tta = read_tta(args.metrics)
        # Keras starts TensorFlow (seconds), and scikit-learn (metrics) takes a second, so they are imported only
        # once the cheap checks have passed.
        from pneumonia import augment, gradcam, metrics, plots
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
        # The mean over the views the evaluate stage scored on (one view: the logits themselves).
        logits = np.mean([logit_net.predict(view, batch_size=32, verbose=0).reshape(-1)
                          for view in augment.tta_views(tta, images)], axis=0, dtype="float64")
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
