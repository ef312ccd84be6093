import numpy as np
import pytest
from scipy.special import expit
from sklearn import metrics as skm

from pneumonia import metrics
from pneumonia.errors import PipelineError


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


def _split(n, share, rng, separation=3.0):
    """(labels, logits) of one split: a logit per image, pneumonia in about `share` of them."""
    y = (rng.random(n) < share).astype(int)
    return y, separation * (2 * y - 1) + rng.normal(0, 2.0, n) + 1.0


RULE = {"calibration": "platt", "prevalence": "validation", "strategy": "target_sensitivity", "target_sensitivity": 0.95}


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (200, 3200):
        val, test = _split(n, 0.74, rng), _split(n, 0.62, rng)
        scale, offset = metrics.fit_calibration("platt", *val)
        threshold = metrics.choose_threshold(val[0], metrics.calibrate(val[1], scale, offset), "target_sensitivity")
        point = metrics.binary_metrics(test[0], metrics.calibrate(test[1], scale, offset), threshold)
        ci = metrics.bootstrap_ci(val, test, samples=300, seed=0, **RULE)
        for name in metrics.CI_METRICS:
            low, high = ci[f"{name}_ci"]
            assert low <= point[name] <= high, name
        widths.append(ci["roc_auc_ci"][1] - ci["roc_auc_ci"][0])
    assert widths[1] < widths[0] / 2
    val, test = _split(200, 0.74, rng), _split(200, 0.62, rng)
    assert metrics.bootstrap_ci(val, test, 100, seed=3, **RULE) == metrics.bootstrap_ci(val, test, 100, seed=3, **RULE)


def _labels_and_scores(n_neg=30, n_pos=70, seed=2):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat([0, 1], [n_neg, n_pos]))
    return y, np.clip(0.3 * y + 0.7 * rng.random(len(y)), 0, 1)


def test_every_bootstrap_resample_keeps_the_class_counts_of_each_split(monkeypatch):
    y_val, _ = _labels_and_scores(n_neg=30, n_pos=70)
    y_test, _ = _labels_and_scores(n_neg=45, n_pos=55, seed=3)
    seen = []
    real = metrics.replicate_metrics

    def recording(val, test, val_rows, test_rows, **kw):
        seen.extend(zip(np.asarray(val[0])[val_rows].sum(1), np.asarray(test[0])[test_rows].sum(1)))
        assert val_rows.shape[1] == 100 and test_rows.shape[1] == 100
        return real(val, test, val_rows, test_rows, **kw)

    monkeypatch.setattr(metrics, "replicate_metrics", recording)
    metrics.bootstrap_ci((y_val, np.zeros(100)), (y_test, np.zeros(100)), samples=230, seed=0, chunk=100)
    assert len(seen) == 230 and set(seen) == {(70, 55)}
    rows = metrics.stratified_indices(y_val, 5, np.random.default_rng(0))
    assert (y_val[rows] == np.repeat([0, 1], [30, 70])).all()  # negatives first, then positives, in every row
    assert len({tuple(r) for r in rows}) == 5  # and the rows differ


def test_bootstrap_of_a_class_share_has_no_spread():
    # Every image is called normal: accuracy is the share of negatives, specificity 1, recall 0.
    # A stratified resample keeps that share, so its interval is one point; a plain resample's is not.
    y, _ = _labels_and_scores(n_neg=20, n_pos=80)
    flat = (y, np.full(len(y), -2.2))  # p = 0.1 everywhere
    ci = metrics.bootstrap_ci(flat, flat, samples=300, seed=0, strategy="fixed", value=0.5)
    assert ci["accuracy_ci"] == [0.2, 0.2] and ci["specificity_ci"] == [1.0, 1.0] and ci["recall_ci"] == [0.0, 0.0]


def test_vectorised_confusion_counts_and_auc_match_sklearn_on_resamples_with_ties():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 150)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(150), 0, 1), 1)  # 11 distinct values: many ties
    rows = rng.integers(0, 150, (40, 150))  # plain resamples: the class counts vary from row to row
    thresholds = rng.choice(np.unique(p), 40)  # on a score value, where ties meet the threshold
    thresholds[:3] = [0.0, 1.0, 1.5]  # everything called pneumonia; only the top scores; nothing
    got = metrics.resampled_metrics(y[rows], p[rows], thresholds)
    for i, (r, t) in enumerate(zip(rows, thresholds)):
        tn, fp, fn, tp = skm.confusion_matrix(y[r], p[r] >= t, labels=[0, 1]).ravel()
        expected = {"accuracy": (tp + tn) / 150, "recall": tp / (tp + fn), "specificity": tn / (tn + fp),
                    "precision": tp / (tp + fp) if tp + fp else 0.0, "f1": 2 * tp / (2 * tp + fp + fn),
                    "roc_auc": skm.roc_auc_score(y[r], p[r])}
        for name, value in expected.items():
            assert got[name][i] == pytest.approx(value, abs=1e-12), (name, i)


@pytest.mark.parametrize("strategy, target", [("target_sensitivity", 0.95), ("target_sensitivity", 0.75),
                                              ("target_sensitivity", 0.5), ("target_sensitivity", 1.0),
                                              ("target_sensitivity", 0.01), ("youden", 0.95), ("fixed", 0.95)])
def test_vectorised_threshold_choice_is_choose_threshold_row_by_row(strategy, target):
    rng = np.random.default_rng(6)
    y = np.repeat([0, 1], [40, 60])
    p = np.round(np.clip(0.35 * y + 0.65 * rng.random(100), 0, 1), 2)  # ties, within and across the classes
    rows = metrics.stratified_indices(y, 60, rng)
    rows[0] = np.arange(100)
    scores = p[rows]
    scores[1] = 0.5  # every score tied: Youden finds no gain, so roc_curve's first point (threshold 1) wins
    got = metrics.choose_thresholds(y[rows], scores, strategy, target, value=0.3)
    expected = [metrics.choose_threshold(y[r], s, strategy, target, value=0.3) for r, s in zip(rows, scores)]
    assert got.tolist() == expected  # exactly: the same scores are picked
    assert len(set(expected)) >= 3 or strategy == "fixed"  # the resamples do move the threshold


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_vectorised_calibration_refit_reaches_each_resamples_optimum(method):
    rng = np.random.default_rng(7)
    y, x = _split(300, 0.74, rng)
    rows = metrics.stratified_indices(y, 20, rng)
    start = metrics.fit_calibration(method, y, x)
    scale, offset = metrics.refit_calibrations(method, y[rows], x[rows], *start)
    assert len(set(scale)) == 20 and (method == "platt") == (len(set(offset)) == 20)
    for r, a, c in zip(rows, scale, offset):
        p = metrics.calibrate(x[r], a, c)
        assert abs(np.sum((y[r] - p) * x[r])) < 1e-6  # the NLL's gradient in the scale is zero
        if method == "platt":
            assert abs(np.sum(y[r] - p)) < 1e-6  # and in the offset
        ref_scale, ref_offset = metrics.fit_calibration(method, y[r], x[r])  # scikit-learn / scipy, looser tolerances
        assert (a, c) == (pytest.approx(ref_scale, rel=5e-3), pytest.approx(ref_offset, abs=5e-3))
        assert skm.log_loss(y[r], p) <= skm.log_loss(y[r], metrics.calibrate(x[r], ref_scale, ref_offset)) + 1e-12
    assert metrics.refit_calibrations("none", y[rows], x[rows], 1.0, 0.0)[0].tolist() == [1.0] * 20


def _evaluation(val, test, calibration, prevalence, strategy, target_sensitivity=0.95, value=0.5):
    """What evaluate does, with the one-sample functions: fit and shift on validation, threshold, test metrics."""
    scale, offset = metrics.fit_calibration(calibration, *val)
    offset += metrics.prevalence_shift(prevalence, val[0])
    threshold = metrics.choose_threshold(val[0], metrics.calibrate(val[1], scale, offset), strategy,
                                         target_sensitivity, value)
    return metrics.binary_metrics(test[0], metrics.calibrate(test[1], scale, offset), threshold)


def test_a_replicate_is_the_evaluation_rerun_on_its_resample():
    rng = np.random.default_rng(8)
    val, test = _split(300, 0.74, rng), _split(400, 0.62, rng)
    rule = {"calibration": "platt", "prevalence": 0.3, "strategy": "target_sensitivity", "target_sensitivity": 0.9}
    # The whole sample, in the layout of a stratified resample: exactly evaluate's numbers.
    whole_val, whole_test = np.argsort(val[0], kind="stable"), np.argsort(test[0], kind="stable")
    got = metrics.replicate_metrics(val, test, whole_val[None], whole_test[None], **rule)
    point = _evaluation(val, test, **rule)
    assert {name: round(float(v[0]), 4) for name, v in got.items()} == {name: point[name] for name in metrics.CI_METRICS}
    # A fixed threshold on the probability: there the refitted calibration and the prevalence shift decide.
    # Validation resampled, within each class as the bootstrap does, from its less confident images only: a fit
    # far from the whole sample's.
    rule |= {"strategy": "fixed", "value": 0.5}
    timid = np.abs(val[1] - np.median(val[1])) < 2.5
    val_rows = np.concatenate([rng.choice(np.flatnonzero(timid & (val[0] == k)), (1, np.sum(val[0] == k)))
                               for k in (0, 1)], axis=1)
    test_rows = rng.integers(0, 400, (1, 400))
    got = metrics.replicate_metrics(val, test, val_rows, test_rows, **rule)
    rerun = _evaluation((val[0][val_rows[0]], val[1][val_rows[0]]), (test[0][test_rows[0]], test[1][test_rows[0]]), **rule)
    unfitted = _evaluation(val, (test[0][test_rows[0]], test[1][test_rows[0]]), **rule)
    for name in ("recall", "specificity", "accuracy"):
        assert got[name][0] == pytest.approx(rerun[name], abs=0.005), name  # scikit-learn's fit has a looser tolerance
    assert abs(unfitted["recall"] - rerun["recall"]) > 0.02 or abs(unfitted["specificity"] - rerun["specificity"]) > 0.02
    shifted = metrics.bootstrap_ci(val, test, 200, seed=0, **rule | {"prevalence": 0.05})
    unshifted = metrics.bootstrap_ci(val, test, 200, seed=0, **rule | {"prevalence": "validation"})
    assert shifted["recall_ci"][1] < unshifted["recall_ci"][0]  # calibrated for 5%, not 74%: fewer called at 0.5


def test_re_choosing_the_threshold_widens_the_sensitivity_interval():
    """With the threshold fixed, sensitivity's interval holds test's sampling only; re-chosen on each validation
    resample, it also holds where the threshold lands, so it is wider. The test resamples are the same draws."""
    rng = np.random.default_rng(9)
    val, test = _split(524, 0.74, rng, separation=2.0), _split(624, 0.625, rng, separation=2.0)
    threshold = metrics.choose_threshold(val[0], metrics.calibrate(val[1], 1.0, 0.0), "target_sensitivity", 0.95)
    rechosen = metrics.bootstrap_ci(val, test, 1000, seed=0, strategy="target_sensitivity", target_sensitivity=0.95)
    fixed = metrics.bootstrap_ci(val, test, 1000, seed=0, strategy="fixed", value=threshold)

    def width(ci):
        return ci["recall_ci"][1] - ci["recall_ci"][0]

    assert width(rechosen) > 1.3 * width(fixed)
    assert rechosen["roc_auc_ci"] == fixed["roc_auc_ci"]  # AUC has no threshold: the same test draws, the same interval


def test_predictive_values_by_bayes_rule_match_hand_computed_ones():
    # sensitivity 0.9, specificity 0.8. At 5%: PPV .9*.05 / (.9*.05 + .2*.95) = .045 / .235; NPV .8*.95 / (.76 + .1*.05).
    got = metrics.predictive_values({"tp": 90, "fn": 10, "tn": 80, "fp": 20})
    assert got == {"ppv_at_prevalence": {"5pct": 0.1915, "20pct": 0.5294, "50pct": 0.8182},
                   "npv_at_prevalence": {"5pct": 0.9935, "20pct": 0.9697, "50pct": 0.8889}}
    # At test's own share PPV is precision, NPV the share of true normals among those cleared.
    counts = {"tp": 377, "fn": 13, "tn": 186, "fp": 48}
    at_test = metrics.predictive_values(counts, prevalences=(390 / 624,))
    assert at_test["ppv_at_prevalence"]["62.5pct"] == round(377 / 425, 4)
    assert at_test["npv_at_prevalence"]["62.5pct"] == round(186 / 199, 4)
    nobody_flagged = metrics.predictive_values({"tp": 0, "fn": 50, "tn": 50, "fp": 0})
    assert set(nobody_flagged["ppv_at_prevalence"].values()) == {None}
    assert nobody_flagged["npv_at_prevalence"]["50pct"] == 0.5


def test_prevalence_shift_moves_the_odds_by_bayes_rule():
    y = np.repeat([0, 1], [25, 75])  # validation: 75% pneumonia
    assert metrics.prevalence_shift("validation", y) == 0.0
    shift = metrics.prevalence_shift(0.2, y)
    p_val = metrics.calibrate(np.array([-1.0, 0.0, 2.5]), 1.3, 0.4)
    p_new = metrics.calibrate(np.array([-1.0, 0.0, 2.5]), 1.3, 0.4 + shift)
    odds = p_val / (1 - p_val) * (0.2 / 0.8) / (0.75 / 0.25)  # posterior odds = likelihood ratio x prior odds
    np.testing.assert_allclose(p_new, odds / (1 + odds), rtol=1e-12)
    with pytest.raises(PipelineError, match="set evaluate.prevalence to validation"):
        metrics.prevalence_shift(0.2, np.ones(10))


def test_under_label_shift_the_shifted_fit_is_calibrated_on_the_new_population():
    """Images drawn from the same two classes, mixed 74% (validation) and 20% (elsewhere): Platt fitted on
    validation and shifted to 20% gives the mean probability and NLL of a fit made on the new population."""
    rng = np.random.default_rng(10)

    def population(n, share):
        y = (rng.random(n) < share).astype(int)
        return y, np.where(y == 1, rng.normal(1.5, 1.2, n), rng.normal(-1.5, 1.2, n))

    val, other = population(4000, 0.74), population(20000, 0.2)
    scale, offset = metrics.fit_calibration("platt", *val)
    shifted = metrics.calibrate(other[1], scale, offset + metrics.prevalence_shift(0.2, val[0]))
    unshifted = metrics.calibrate(other[1], scale, offset)
    assert shifted.mean() == pytest.approx(other[0].mean(), abs=0.01) and unshifted.mean() > 0.35
    best = metrics.calibrate(other[1], *metrics.fit_calibration("platt", *other))
    assert skm.log_loss(other[0], shifted) < skm.log_loss(other[0], best) + 0.005 < skm.log_loss(other[0], unshifted)


def test_calibrate_is_the_sigmoid_of_the_scaled_and_offset_logit():
    x = np.array([-3.0, 0.0, 0.7])
    np.testing.assert_array_equal(metrics.calibrate(x, 0.5, -0.2), expit(0.5 * x - 0.2))
    np.testing.assert_array_equal(metrics.calibrate([[1.0], [2.0]], np.array([[2.0], [1.0]]), 0.0), expit([[2.0], [2.0]]))


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
