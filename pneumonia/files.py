"""The files the stages share: their paths (dvc.yaml declares the same), atomic writes (an output appears complete
or not at all), and reading the operating point that the evaluate stage writes to metrics.json."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from pneumonia.errors import PipelineError

RAW_DIR = Path("data/raw")
RAW_NPZ, PROVENANCE = RAW_DIR / "pneumoniamnist.npz", RAW_DIR / "provenance.json"
RESIZED_DIR = Path("data/resized")
HEAD_MODEL, HEAD_RECORD = Path("models/head.keras"), Path("models/head.json")
FINAL_MODEL, FINAL_RECORD = Path("models/model.keras"), Path("models/model.json")
METRICS, PREDICTIONS = Path("metrics/metrics.json"), Path("metrics/predictions.csv")
PLOTS_DIR, ERRORS_DIR = Path("plots"), Path("plots/errors")
MODEL_CARD, ERRORS_CSV = Path("reports/model_card.md"), Path("reports/errors.csv")
TTA_RANGES = ("translate", "rotate", "zoom", "contrast")  # augment's, drawing the test-time views


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def _read_metrics(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise PipelineError(f"metrics: cannot read {path} ({exc.strerror}); run dvc repro or pass --metrics") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"metrics: {path} is not valid JSON; run dvc repro evaluate to rewrite it") from None


def read_tta(path: Path) -> dict:
    """The test-time augmentation the evaluate stage scored with (metrics.json's tta, pneumonia.augment.tta_views):
    its calibration and threshold hold for logits averaged over those views. None recorded (before TTA): one view."""
    tta = _read_metrics(path).get("tta", {"views": 1})
    try:
        views = int(tta["views"])
        drawn = {} if views == 1 else {"seed": int(tta["seed"]), **{k: float(tta[k]) for k in TTA_RANGES}}
    except (KeyError, TypeError, ValueError):
        views = 0
    if views < 1:
        raise PipelineError(f"metrics: {path}: tta is {tta!r}, not the views, seed and {', '.join(TTA_RANGES)} the "
                            "evaluate stage records; rerun dvc repro evaluate to rewrite it")
    return {"views": views, **drawn}


def read_operating_point(path: Path) -> tuple[float, float, float]:
    """(threshold, scale, offset) that the evaluate stage chose on validation: p = metrics.calibrate(logit, scale, offset).

    The offset already holds the shift to evaluate.prevalence, so nothing else in metrics.json changes p.

    A metrics.json from before platt calibration has only a temperature T: scale 1/T, offset 0.
    """
    result = _read_metrics(path)
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
