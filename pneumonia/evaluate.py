"""Evaluation: probabilities, calibration, the operating threshold, metrics with CIs, and curves."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from scipy.special import expit

from pneumonia import metrics, plots
from pneumonia.files import write_json, write_text


def logits(model, images, batch_size: int) -> np.ndarray:
    from pneumonia.model import logits_model

    return logits_model(model).predict(images, batch_size=batch_size, verbose=0).reshape(-1).astype("float64")


def evaluate(val, test, val_logits, test_logits, params, metrics_path: Path, predictions_path: Path, plots_dir: Path) -> dict:
    """val/test are (images, labels); writes metrics.json, predictions.csv and the plots; returns the metrics."""
    cfg = params.evaluate
    y_val, y_test = val[1], test[1]
    temperature = metrics.fit_temperature(y_val, val_logits) if cfg.calibration == "temperature" else 1.0
    raw = {"val": expit(val_logits), "test": expit(test_logits)}
    calibrated = {"val": expit(val_logits / temperature), "test": expit(test_logits / temperature)}

    threshold = metrics.choose_threshold(
        y_val, calibrated["val"], cfg.threshold.strategy, cfg.threshold.target_sensitivity, cfg.threshold.value
    )
    test_metrics = metrics.binary_metrics(y_test, calibrated["test"], threshold)
    if cfg.bootstrap.samples:
        test_metrics |= metrics.bootstrap_ci(y_test, calibrated["test"], threshold, cfg.bootstrap.samples, params.seed)
    result = {
        "test": test_metrics,
        # The reference notebook's operating point: the uncalibrated model at 0.5.
        "test_at_0.5": metrics.binary_metrics(y_test, raw["test"], 0.5),
        "val": metrics.binary_metrics(y_val, calibrated["val"], threshold),
        "calibration": {"temperature": temperature, **metrics.calibration_summary(y_test, raw["test"], calibrated["test"])},
    }
    write_json(metrics_path, result)
    write_predictions(predictions_path, {"val": y_val, "test": y_test}, raw, calibrated)

    predicted = (calibrated["test"] >= threshold).astype(int)
    plots.roc(y_test, calibrated["test"], test_metrics, plots_dir / "roc.json", plots_dir / "figures" / "roc.png")
    plots.precision_recall(y_test, calibrated["test"], plots_dir / "precision_recall.json", plots_dir / "figures" / "precision_recall.png")
    plots.confusion(y_test, predicted, plots_dir / "confusion.json", plots_dir / "figures" / "confusion_matrix.png", threshold)
    # Both curves always exist (with calibration none they coincide), so the declared outputs do too.
    curves = {"uncalibrated": raw["test"], "temperature": calibrated["test"]}
    plots.reliability(y_test, curves, plots_dir, plots_dir / "figures" / "reliability.png")
    return result


def write_predictions(path: Path, labels: dict, raw: dict, calibrated: dict) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["split", "index", "label", "probability", "calibrated_probability"])
    for split in ("val", "test"):
        for i, (y, p, c) in enumerate(zip(labels[split], raw[split], calibrated[split])):
            writer.writerow([split, i, int(y), repr(float(p)), repr(float(c))])  # exact: error_analysis decides on these
    write_text(path, out.getvalue())


def read_predictions(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, calibrated probabilities) of one split from predictions.csv."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["calibrated_probability"]) for r in rows])
