"""Evaluation: probabilities, calibration, the operating threshold, metrics with CIs, and curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

from pneumonia import metrics, plots
from pneumonia.errors import PipelineError
from pneumonia.files import write_json, write_text
from pneumonia.progress import progress


def tta_record(params) -> dict:
    """Test-time augmentation as metrics.json records it and pneumonia.predict applies it: the number of views,
    and with more than one the seed and augment's ranges that draw them (augment.tta_views)."""
    if params.evaluate.tta == 1:
        return {"views": 1}
    ranges = params.augment
    return {"views": params.evaluate.tta, "seed": params.seed, "translate": ranges.translate, "rotate": ranges.rotate,
            "zoom": ranges.zoom, "contrast": ranges.contrast}


def logits(model, images, batch_size: int, split: str, tta: dict | None = None) -> np.ndarray:
    """The model's logits of `images`; with test-time augmentation (`tta`: tta_record's), their mean over its views."""
    import keras

    from pneumonia import augment
    from pneumonia.model import logits_model

    net, tta = logits_model(model), tta or {"views": 1}
    out = []
    for k, view in enumerate(augment.tta_views(tta, images)):
        what = f"predicting {split}" + (f", view {k + 1} of {tta['views']}" if tta["views"] > 1 else "")
        with progress(len(images), what) as report:
            # Keras calls this after each batch, with the batch's index.
            batch_done = keras.callbacks.LambdaCallback(
                on_predict_batch_end=lambda batch, logs: report(min((batch + 1) * batch_size, len(images))))
            out.append(net.predict(view, batch_size=batch_size, verbose=0, callbacks=[batch_done]).reshape(-1))
    return np.mean(out, axis=0, dtype="float64")  # one view: its logits exactly


def evaluate(val, test, val_logits, test_logits, params, metrics_path: Path, predictions_path: Path, plots_dir: Path) -> dict:
    """val/test are (images, labels); writes metrics.json, predictions.csv and the plots; returns the metrics."""
    cfg = params.evaluate
    y_val, y_test = val[1], test[1]
    scale, fitted_offset = metrics.fit_calibration(cfg.calibration, y_val, val_logits)
    shift = metrics.prevalence_shift(cfg.prevalence, y_val)
    offset = fitted_offset + shift  # the one offset applied here, written to metrics.json and applied by predict
    raw = {"val": expit(val_logits), "test": expit(test_logits)}
    calibrated = {"val": metrics.calibrate(val_logits, scale, offset), "test": metrics.calibrate(test_logits, scale, offset)}

    rule = {"strategy": cfg.threshold.strategy, "target_sensitivity": cfg.threshold.target_sensitivity,
            "value": cfg.threshold.value}
    threshold = metrics.choose_threshold(y_val, calibrated["val"], **rule)
    test_metrics = metrics.binary_metrics(y_test, calibrated["test"], threshold)
    test_metrics |= metrics.predictive_values(test_metrics)
    if cfg.bootstrap.samples:
        test_metrics |= metrics.bootstrap_ci((y_val, val_logits), (y_test, test_logits), cfg.bootstrap.samples,
                                             params.seed, calibration=cfg.calibration, prevalence=cfg.prevalence, **rule)
    result = {
        "test": test_metrics,
        # The reference notebook's operating point: the uncalibrated model at 0.5.
        "test_at_0.5": metrics.binary_metrics(y_test, raw["test"], 0.5),
        "val": metrics.binary_metrics(y_val, calibrated["val"], threshold),
        "calibration": {
            "method": cfg.calibration, "scale": scale, "offset": offset,
            "temperature": 1.0 / scale if cfg.calibration != "platt" else None,  # None: platt is not a temperature
            # The share of pneumonia the probabilities are for, and the log-odds added to the fit to get there.
            "prevalence": round(float(np.mean(y_val)) if cfg.prevalence == "validation" else cfg.prevalence, 4),
            "prevalence_shift": shift,
            **metrics.calibration_summary(y_test, raw["test"], calibrated["test"]),
            # Which method generalises on validation: 5-fold held-out NLL of each (the in-sample fit favours platt).
            # The folds are fixed (seeded 0), not the run's seed, so runs of different seeds are scored alike.
            "cv_nll": {m: round(metrics.cross_validated_nll(m, y_val, val_logits), 4)
                       for m in metrics.CALIBRATIONS},
        },
        "tta": tta_record(params),  # the views each logit is a mean over; pneumonia.predict uses the same
    }
    write_json(metrics_path, result)
    write_predictions(predictions_path, {"val": y_val, "test": y_test}, raw, calibrated)

    predicted = (calibrated["test"] >= threshold).astype(int)
    plots.roc(y_test, calibrated["test"], test_metrics, plots_dir / "roc.json", plots_dir / "figures" / "roc.png")
    plots.precision_recall(y_test, calibrated["test"], plots_dir / "precision_recall.json", plots_dir / "figures" / "precision_recall.png")
    plots.confusion(y_test, predicted, plots_dir / "confusion.json", plots_dir / "figures" / "confusion_matrix.png", threshold)
    # Both curves always exist (with calibration none they coincide), so the declared outputs do too.
    curves = {"uncalibrated": raw["test"], "calibrated": calibrated["test"]}
    plots.reliability(y_test, curves, plots_dir, plots_dir / "figures" / "reliability.png")
    return result


def write_predictions(path: Path, labels: dict, raw: dict, calibrated: dict) -> None:
    table = pd.concat([
        pd.DataFrame({"split": split, "index": np.arange(len(labels[split])), "label": np.asarray(labels[split], dtype=int),
                      "probability": np.asarray(raw[split], dtype="float64"),
                      "calibrated_probability": np.asarray(calibrated[split], dtype="float64")})
        for split in ("val", "test")
    ])
    # pandas writes float64 as repr does (shortest exact digits): error_analysis decides on these at the threshold.
    write_text(path, table.to_csv(index=False, lineterminator="\n"))


def read_predictions(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, calibrated probabilities) of one split from predictions.csv."""
    try:
        table = pd.read_csv(path, float_precision="round_trip")  # pandas' default parser may be off by an ulp
        rows = table[table["split"] == split]
        labels, probs = rows["label"].to_numpy(), rows["calibrated_probability"].to_numpy(dtype="float64")
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise PipelineError(f"metrics: cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            "rerun dvc repro evaluate to rewrite it") from None
    if len(rows) == 0 or not np.isin(labels, (0, 1)).all() or not np.isfinite(probs).all():
        raise PipelineError(f"metrics: {path} has no valid {split} rows (labels 0/1, finite probabilities); "
                            "rerun dvc repro evaluate to rewrite it")
    return labels, probs
