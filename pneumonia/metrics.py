"""Metrics, operating threshold, calibration and bootstrap CIs, on top of scikit-learn."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from scipy.stats import rankdata
from sklearn import metrics as skm

from pneumonia.errors import PipelineError
from pneumonia.progress import progress

CI_METRICS = ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc")
# Shares of pneumonia where a screening aid might run, for PPV and NPV; test's own share (62.5%) is not one.
DEPLOYMENT_PREVALENCES = (0.05, 0.2, 0.5)


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


def _pct_key(prevalence: float) -> str:
    return f"{100 * prevalence:g}pct"  # "5pct": a dot in a key would read as nesting in `dvc metrics` names


def predictive_values(counts: dict, prevalences=DEPLOYMENT_PREVALENCES) -> dict:
    """PPV and NPV where pneumonia has each prevalence, from the sensitivity and specificity of `counts` (tp, fn,
    tn, fp) by Bayes' rule, assuming both carry over to that population; None where undefined."""
    ppv, npv = {}, {}
    for p in prevalences:
        ppv[_pct_key(p)] = npv[_pct_key(p)] = None
        if counts["tp"] + counts["fn"] and counts["tn"] + counts["fp"]:
            sens, spec = counts["tp"] / (counts["tp"] + counts["fn"]), counts["tn"] / (counts["tn"] + counts["fp"])
            flagged, cleared = sens * p + (1 - spec) * (1 - p), spec * (1 - p) + (1 - sens) * p
            ppv[_pct_key(p)] = _r(sens * p / flagged) if flagged else None  # nobody flagged: no PPV
            npv[_pct_key(p)] = _r(spec * (1 - p) / cleared) if cleared else None
    return {"ppv_at_prevalence": ppv, "npv_at_prevalence": npv}


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


def calibrate(logits, scale, offset):
    """The calibrated probability sigmoid(scale * logit + offset); every stage and tool computes it here."""
    return expit(scale * np.asarray(logits, dtype="float64") + offset)


def fit_temperature(labels, logits) -> float:
    """Temperature T minimising validation NLL of sigmoid(logit / T)."""
    labels, logits = np.asarray(labels, dtype="float64"), np.asarray(logits, dtype="float64")

    def nll(log_t):
        return skm.log_loss(labels, np.clip(calibrate(logits, np.exp(-log_t), 0.0), 1e-12, 1 - 1e-12), labels=[0, 1])

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


def prevalence_shift(prevalence, labels) -> float:
    """What to add to the calibrated log-odds so that the probabilities hold where pneumonia has `prevalence`.

    The calibration fitted on `labels` (validation) gives probabilities for validation's class mix: Platt's
    offset learns it exactly, and temperature and none keep the training split's, which validation (a 10%
    slice of it) shares. By Bayes' rule the posterior odds are the likelihood ratio times the prior odds, so
    another prevalence multiplies the odds by the ratio of the prior odds: exact when only the class mix
    differs (label shift). "validation": no shift.
    """
    if prevalence == "validation":
        return 0.0
    share = float(np.mean(labels))
    if not 0 < share < 1:
        raise PipelineError("evaluate: validation holds one class only; set evaluate.prevalence to validation")
    return float(logit(prevalence) - logit(share))


def cross_validated_nll(method: str, labels, logits, folds: int = 5, seed: int = 0) -> float:
    """Mean held-out NLL of `method` over stratified folds of the validation split: an honest comparison,
    where the in-sample NLL always favours the method with more parameters."""
    from sklearn.model_selection import StratifiedKFold

    labels, logits = np.asarray(labels), np.asarray(logits, dtype="float64")
    losses = []
    for fit_rows, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(logits, labels):
        scale, offset = fit_calibration(method, labels[fit_rows], logits[fit_rows])
        probs = np.clip(calibrate(logits[held_out], scale, offset), 1e-12, 1 - 1e-12)
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


# The bootstrap, vectorised: each function below does for every row of (replicates, n) matrices what its
# one-sample counterpart above does for one sample.

def stratified_indices(labels, rows: int, rng) -> np.ndarray:
    """(rows, n) indices into `labels`, each row a resample that keeps the class counts: negatives, then positives."""
    groups = [np.flatnonzero(np.asarray(labels) == k) for k in (0, 1)]
    return np.concatenate([g[rng.integers(0, len(g), (rows, len(g)))] for g in groups if len(g)], axis=1)


def _nll(labels, logits, scale, offset) -> np.ndarray:
    z = scale[:, None] * logits + offset[:, None]
    return (np.logaddexp(0, z) - labels * z).sum(1)  # sum of -log p(label), stable for any z


def refit_calibrations(method: str, labels, logits, scale: float, offset: float, steps: int = 50):
    """fit_calibration on each row: (scale, offset) arrays, by Newton's method on the NLL started from the full
    sample's fit, near which a resample's optimum lies, so a few steps converge; a step that would raise the NLL
    (far from the optimum) is halved until it does not."""
    labels, logits = np.asarray(labels, dtype="float64"), np.asarray(logits, dtype="float64")
    a, c = np.full(len(logits), float(scale)), np.full(len(logits), float(offset))
    if method == "none":
        return a, c
    nll = _nll(labels, logits, a, c)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(steps):
            p = calibrate(logits, a[:, None], c[:, None])
            residual, weight = labels - p, p * (1 - p)
            g_a, h_aa = (residual * logits).sum(1), (weight * logits**2).sum(1)
            if method == "temperature":
                da, dc = g_a / h_aa, np.zeros_like(a)
            else:  # platt: the 2x2 Newton system, solved in closed form
                g_c, h_ac, h_cc = residual.sum(1), (weight * logits).sum(1), weight.sum(1)
                det = h_aa * h_cc - h_ac**2
                da, dc = (h_cc * g_a - h_ac * g_c) / det, (h_aa * g_c - h_ac * g_a) / det
            # A separable resample has no optimum (h -> 0): its row stops where it is.
            finite = np.isfinite(da) & np.isfinite(dc)
            da, dc = np.where(finite, da, 0), np.where(finite, dc, 0)
            step = ((np.abs(da) > 1e-10) | (np.abs(dc) > 1e-10)).astype("float64")  # 0: converged
            if not step.any():
                break
            for _ in range(30):
                trial = _nll(labels, logits, a + step * da, c + step * dc)
                worse = ~(trial <= nll + 1e-9 * np.abs(nll))  # not a rise: sums of n terms carry rounding
                if not worse.any():
                    break
                step = np.where(worse, step / 2, step)
            step = np.where(worse, 0, step)
            a, c, nll = a + step * da, c + step * dc, np.where(worse, nll, trial)
    return a, c


def choose_thresholds(labels, probs, strategy: str, target_sensitivity: float = 0.95, value: float = 0.5) -> np.ndarray:
    """choose_threshold on each row, with roc_curve's arithmetic, so its ties and float edges come out alike."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype="float64")
    rows = np.arange(len(probs))
    if strategy == "fixed":
        return np.full(len(probs), float(value))
    positives = labels == 1
    n_pos, n_neg = positives.sum(1), (~positives).sum(1)
    if strategy == "target_sensitivity":
        # The highest threshold with sensitivity >= target is the k-th highest positive score, k the fewest
        # positives whose share reaches the target (the share computed as roc_curve computes tpr).
        ranked = -np.sort(-np.where(positives, probs, -np.inf), axis=1)
        k = np.argmax(np.arange(1, probs.shape[1] + 1) / n_pos[:, None] >= target_sensitivity - 1e-12, axis=1)
        return np.minimum(ranked[rows, k], 1.0)
    if strategy == "youden":
        order = np.argsort(-probs, axis=1, kind="stable")
        ranked, hit = np.take_along_axis(probs, order, 1), np.take_along_axis(positives, order, 1)
        j = np.cumsum(hit, 1) / n_pos[:, None] - np.cumsum(~hit, 1) / n_neg[:, None]
        last_of_ties = np.append(ranked[:, :-1] != ranked[:, 1:], np.ones((len(probs), 1), bool), axis=1)
        j = np.where(last_of_ties, j, -np.inf)  # roc_curve has one point per distinct score
        best = np.argmax(j, axis=1)  # the first maximum: the highest threshold, as argmax over roc_curve
        # roc_curve's first point (threshold +inf, clipped to 1; J = 0) wins when nothing does better.
        return np.where(j[rows, best] > 0, ranked[rows, best], 1.0)
    raise ValueError(f"unknown threshold strategy {strategy!r}")


def _ratio(num, den):
    return np.divide(num, den, out=np.zeros(np.shape(num)), where=den > 0)  # zero_division=0, as binary_metrics


def resampled_metrics(labels, probs, thresholds) -> dict[str, np.ndarray]:
    """CI_METRICS of each row at its threshold: confusion counts by comparison, ROC AUC by ranks (Mann-Whitney
    U with average ranks for ties, which equals roc_auc_score); the row must hold both classes."""
    positives, probs = np.asarray(labels) == 1, np.asarray(probs, dtype="float64")
    called = probs >= np.asarray(thresholds)[:, None]
    tp, fp = (called & positives).sum(1), (called & ~positives).sum(1)
    n_pos, n_neg = positives.sum(1), (~positives).sum(1)
    fn, tn = n_pos - tp, n_neg - fp
    rank_sum = np.where(positives, rankdata(probs, axis=1), 0).sum(1)
    return {"accuracy": (tp + tn) / (n_pos + n_neg), "recall": _ratio(tp, n_pos), "specificity": _ratio(tn, n_neg),
            "precision": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "roc_auc": (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)}


def replicate_metrics(val, test, val_rows, test_rows, calibration: str = "none", prevalence="validation",
                      strategy: str = "target_sensitivity", target_sensitivity: float = 0.95, value: float = 0.5,
                      fitted: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """The evaluation rerun on resamples: val and test are (labels, logits); val_rows, test_rows (replicates, n)
    indices. The calibration is refitted (from `fitted`, the full validation's fit) and the threshold re-chosen
    on each validation resample, as evaluate does on validation, and the test resample is scored with them."""
    (y_val, x_val), (y_test, x_test) = [(np.asarray(y), np.asarray(x, dtype="float64")) for y, x in (val, test)]
    # Every calibration is monotone, so the refit moves which images are flagged only under a fixed threshold;
    # the other rules pick among the validation scores. It is cheap, so it is always done.
    scale, offset = refit_calibrations(calibration, y_val[val_rows], x_val[val_rows],
                                       *(fitted or fit_calibration(calibration, y_val, x_val)))
    offset = offset + prevalence_shift(prevalence, y_val)  # a stratified resample keeps validation's share
    thresholds = choose_thresholds(y_val[val_rows], calibrate(x_val[val_rows], scale[:, None], offset[:, None]),
                                   strategy, target_sensitivity, value)
    return resampled_metrics(y_test[test_rows], calibrate(x_test[test_rows], scale[:, None], offset[:, None]), thresholds)


def bootstrap_ci(val, test, samples: int, seed: int, level: float = 0.95, chunk: int = 500, **rule) -> dict:
    """Percentile intervals of CI_METRICS on test from a bootstrap of validation and test together, each
    resampled within each class (stratified), so the intervals carry the operating point's uncertainty as well
    as test's. val and test are (labels, logits); rule: replicate_metrics' calibration, prevalence and threshold
    rule. Replicates run `chunk` at a time, which bounds the memory."""
    rng = np.random.default_rng(seed)
    fitted = fit_calibration(rule.get("calibration", "none"), *val)
    draws = {name: [] for name in CI_METRICS}
    with progress(samples, "bootstrap", "resamples") as report:
        for done in range(0, samples, chunk):
            rows = min(chunk, samples - done)
            val_rows, test_rows = stratified_indices(val[0], rows, rng), stratified_indices(test[0], rows, rng)
            for name, values in replicate_metrics(val, test, val_rows, test_rows, fitted=fitted, **rule).items():
                draws[name].append(values)
            report(done + rows)
    tail = (1 - level) / 2 * 100
    return {f"{name}_ci": [_r(v) for v in np.percentile(np.concatenate(values), [tail, 100 - tail])]
            for name, values in draws.items()}
