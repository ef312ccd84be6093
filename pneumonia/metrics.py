"""Metrics, operating threshold, calibration and bootstrap CIs, on top of scikit-learn."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn import metrics as skm

from pneumonia.progress import progress

CI_METRICS = ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc")


def _r(x: float) -> float:
    return round(float(x), 4)


def binary_metrics(labels, probs, threshold: float) -> dict:
    """Every headline metric at one threshold (a probability >= threshold is called pneumonia)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype="float64")
    predicted = (probs >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": _r(skm.accuracy_score(labels, predicted)),
        "precision": _r(skm.precision_score(labels, predicted, zero_division=0)),
        "recall": _r(skm.recall_score(labels, predicted, zero_division=0)),
        "specificity": _r(skm.recall_score(labels, predicted, pos_label=0, zero_division=0)),
        "f1": _r(skm.f1_score(labels, predicted, zero_division=0)),
        "roc_auc": _r(skm.roc_auc_score(labels, probs)) if both_classes else None,
        "pr_auc": _r(skm.average_precision_score(labels, probs)) if both_classes else None,
        "loss": _r(skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
        "threshold": float(threshold),  # a decision parameter, kept exact: rounding could flip decisions
    }


def choose_threshold(labels, probs, strategy: str, target_sensitivity: float = 0.95, value: float = 0.5) -> float:
    """The operating threshold, from validation scores only."""
    if strategy == "fixed":
        return float(value)
    fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # the first threshold is +inf
    if strategy == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])
    if strategy == "target_sensitivity":
        # tpr rises as the threshold falls: the first point reaching the target is the highest such threshold.
        return float(thresholds[np.argmax(tpr >= target_sensitivity - 1e-12)])
    raise ValueError(f"unknown threshold strategy {strategy!r}")


def fit_temperature(labels, logits) -> float:
    """Temperature T minimising validation NLL of sigmoid(logit / T)."""
    labels, logits = np.asarray(labels, dtype="float64"), np.asarray(logits, dtype="float64")

    def nll(log_t):
        return skm.log_loss(labels, np.clip(expit(logits / np.exp(log_t)), 1e-12, 1 - 1e-12), labels=[0, 1])

    return float(np.exp(minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded").x))


CALIBRATIONS = ("none", "temperature", "platt")


def fit_calibration(method: str, labels, logits) -> tuple[float, float]:
    """(scale, offset) such that the calibrated probability is sigmoid(scale * logit + offset), fitted by NLL.

    none: (1, 0). temperature: (1/T, 0), one parameter. platt: both, an unpenalised logistic regression on the
    logit; it contains temperature, so it always fits validation at least as well, and its offset also learns
    validation's class mix, which the test split need not share.
    """
    if method == "none":
        return 1.0, 0.0
    if method == "temperature":
        return 1.0 / fit_temperature(labels, logits), 0.0
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(C=np.inf).fit(np.asarray(logits, dtype="float64")[:, None], labels)
    return float(fitted.coef_[0, 0]), float(fitted.intercept_[0])


def cross_validated_nll(method: str, labels, logits, folds: int = 5, seed: int = 0) -> float:
    """Mean held-out NLL of `method` over stratified folds of the validation split: an honest comparison,
    where the in-sample NLL always favours the method with more parameters."""
    from sklearn.model_selection import StratifiedKFold

    labels, logits = np.asarray(labels), np.asarray(logits, dtype="float64")
    losses = []
    for fit_rows, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(logits, labels):
        scale, offset = fit_calibration(method, labels[fit_rows], logits[fit_rows])
        probs = np.clip(expit(scale * logits[held_out] + offset), 1e-12, 1 - 1e-12)
        losses.append(skm.log_loss(labels[held_out], probs, labels=[0, 1]))
    return float(np.mean(losses))


def expected_calibration_error(labels, probs, bins: int = 10) -> float:
    """Sum over equal-width bins of |observed rate - mean probability|, weighted by bin size."""
    labels, probs = np.asarray(labels, dtype="float64"), np.asarray(probs, dtype="float64")
    which = np.clip(np.digitize(probs, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() / len(probs) * abs(labels[mask].mean() - probs[mask].mean())
    return float(total)


def calibration_summary(labels, raw, calibrated) -> dict:
    return {
        "brier_before": _r(skm.brier_score_loss(labels, raw)),
        "brier_after": _r(skm.brier_score_loss(labels, calibrated)),
        "ece_before": _r(expected_calibration_error(labels, raw)),
        "ece_after": _r(expected_calibration_error(labels, calibrated)),
    }


def bootstrap_ci(labels, probs, threshold: float, samples: int, seed: int, level: float = 0.95) -> dict:
    """Stratified bootstrap percentile intervals: each resample keeps the class counts."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == k) for k in (0, 1)]
    draws = {name: [] for name in CI_METRICS}
    with progress(samples, "bootstrap", "resamples") as report:
        for i in range(samples):
            idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
            m = binary_metrics(labels[idx], probs[idx], threshold)
            for name in CI_METRICS:
                draws[name].append(m[name])
            report(i + 1)
    tail = (1 - level) / 2 * 100
    return {f"{name}_ci": [_r(np.percentile(v, tail)), _r(np.percentile(v, 100 - tail))] for name, v in draws.items()}
