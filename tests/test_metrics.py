import numpy as np
import pytest
from scipy.special import expit
from sklearn import metrics as skm

from pneumonia import metrics


def test_binary_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    m = metrics.binary_metrics(y, p, 0.5)
    pred = p >= 0.5
    assert m["tp"] == np.sum(pred & (y == 1)) and m["fp"] == np.sum(pred & (y == 0))
    assert m["tn"] == np.sum(~pred & (y == 0)) and m["fn"] == np.sum(~pred & (y == 1))
    assert m["specificity"] == round(m["tn"] / (m["tn"] + m["fp"]), 4)
    assert m["recall"] == round(m["tp"] / (m["tp"] + m["fn"]), 4)
    assert m["roc_auc"] == round(skm.roc_auc_score(y, p), 4)
    assert m["loss"] == round(skm.log_loss(y, p), 4)
    assert set(m) == {"accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc", "loss",
                      "tp", "fp", "tn", "fn", "threshold"}


def test_threshold_strategies_on_hand_made_scores():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.35, 0.6, 0.3, 0.5, 0.7, 0.9])
    # sensitivity >= 0.75 first reached at 0.5 (positives 0.5, 0.7, 0.9); 1.0 needs 0.3.
    assert metrics.choose_threshold(y, s, "target_sensitivity", 0.75) == 0.5
    assert metrics.choose_threshold(y, s, "target_sensitivity", 0.76) == 0.3
    assert metrics.choose_threshold(y, s, "target_sensitivity", 1.0) == 0.3
    # Youden: at 0.5: tpr 0.75, fpr 0.25 (J 0.5); at 0.7: tpr .5 fpr 0 (J .5); first max wins -> 0.7.
    assert metrics.choose_threshold(y, s, "youden") == 0.7
    assert metrics.choose_threshold(y, s, "fixed", value=0.42) == 0.42


def test_temperature_scaling_lowers_nll_on_overconfident_scores():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < expit(true_logit)).astype(int)
    overconfident = true_logit * 4
    t = metrics.fit_temperature(y, overconfident)
    assert 3.0 < t < 5.0
    assert skm.log_loss(y, expit(overconfident / t)) < skm.log_loss(y, expit(overconfident)) - 0.1


def test_ece_and_brier_match_direct_computation():
    y = np.array([0, 1, 1, 0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.55, 0.45, 0.95, 0.85, 0.92, 0.58])
    # bins of width 0.1: [0.05]->bin0 {0}; [0.15]->bin1 {1}; [0.45]->bin4 {0}; [0.55,0.58]->bin5 {1,1};
    # [0.85]->bin8 {1}; [0.92,0.95]->bin9 {0,1}
    direct = (abs(0 - 0.05) + abs(1 - 0.15) + abs(0 - 0.45) + 2 * abs(1 - 0.565) + abs(1 - 0.85) + 2 * abs(0.5 - 0.935)) / 8
    assert metrics.expected_calibration_error(y, p) == pytest.approx(direct)
    summary = metrics.calibration_summary(y, p, p)
    assert summary["brier_before"] == round(float(np.mean((p - y) ** 2)), 4) == summary["brier_after"]


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
    rng = np.random.default_rng(1)

    def data(n):
        y = rng.integers(0, 2, n)
        return y, np.clip(0.35 * y + rng.random(n) * 0.65, 0, 1)

    widths = []
    for n in (200, 3200):
        y, p = data(n)
        point = metrics.binary_metrics(y, p, 0.5)
        ci = metrics.bootstrap_ci(y, p, 0.5, samples=300, seed=0)
        for name in metrics.CI_METRICS:
            low, high = ci[f"{name}_ci"]
            assert low <= point[name] <= high, name
        widths.append(ci["roc_auc_ci"][1] - ci["roc_auc_ci"][0])
    assert widths[1] < widths[0] / 2
    y, p = data(200)
    assert metrics.bootstrap_ci(y, p, 0.5, 100, seed=3) == metrics.bootstrap_ci(y, p, 0.5, 100, seed=3)


def _labels_and_scores(n_neg=30, n_pos=70, seed=2):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat([0, 1], [n_neg, n_pos]))
    return y, np.clip(0.3 * y + 0.7 * rng.random(len(y)), 0, 1)


def test_every_bootstrap_resample_keeps_the_class_counts(monkeypatch):
    y, p = _labels_and_scores()
    seen = []
    real = metrics.binary_metrics

    def recording(labels, probs, threshold):
        seen.append(np.bincount(labels, minlength=2).tolist())
        return real(labels, probs, threshold)

    monkeypatch.setattr(metrics, "binary_metrics", recording)
    metrics.bootstrap_ci(y, p, 0.5, samples=200, seed=0)
    assert len(seen) == 200 and all(counts == [30, 70] for counts in seen)


def test_bootstrap_of_a_class_share_has_no_spread():
    # Every image is called normal: accuracy is the share of negatives, specificity 1, recall 0.
    # A stratified resample keeps that share, so its interval is one point; a plain resample's is not.
    y, _ = _labels_and_scores(n_neg=20, n_pos=80)
    p = np.full(len(y), 0.1)
    ci = metrics.bootstrap_ci(y, p, 0.5, samples=300, seed=0)
    assert ci["accuracy_ci"] == [0.2, 0.2] and ci["specificity_ci"] == [1.0, 1.0] and ci["recall_ci"] == [0.0, 0.0]


def test_platt_contains_temperature_and_cross_validation_is_held_out():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0.8, 1.5, 600)  # a class mix far from 50:50
    y = (rng.random(600) < expit(true_logit)).astype(int)
    logits = 3 * true_logit - 2  # over-confident and shifted
    assert metrics.fit_calibration("none", y, logits) == (1.0, 0.0)
    scale, offset = metrics.fit_calibration("temperature", y, logits)
    assert offset == 0.0 and scale == pytest.approx(1 / metrics.fit_temperature(y, logits))
    a, b = metrics.fit_calibration("platt", y, logits)
    assert a == pytest.approx(1 / 3, rel=0.15) and b == pytest.approx(2 / 3, abs=0.25)  # undoes the distortion

    def nll(scale, offset):
        return skm.log_loss(y, expit(scale * logits + offset))

    assert nll(a, b) <= nll(scale, 0.0) <= nll(1.0, 0.0)  # in sample, more parameters always fit better
    cv = {m: metrics.cross_validated_nll(m, y, logits, seed=0) for m in metrics.CALIBRATIONS}
    assert cv["platt"] < cv["temperature"] < cv["none"]  # here the offset is real, so it generalises
    assert cv["platt"] > nll(a, b)  # held out: worse than the in-sample fit
    assert metrics.cross_validated_nll("platt", y, logits, seed=0) == cv["platt"]  # seeded folds
