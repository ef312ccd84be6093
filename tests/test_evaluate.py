"""The evaluate stage without a model: metrics.json, predictions.csv (probabilities bit for bit) and the model card."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumonia import evaluate

# Values whose shortest decimal form is long, or which sit at the edges of float64.
SPECIAL = [0.1, 1 / 3, 2 / 3, 1e-300, 5e-324, 0.9999999999999999, 0.0, 1.0, 0.5, np.nextafter(0.5, 0), np.nextafter(0.5, 1)]


def _round_trip(path, val, test):
    labels = {"val": np.arange(len(val)) % 2, "test": np.arange(len(test)) % 2}
    raw = {"val": val[::-1].copy(), "test": test[::-1].copy()}
    evaluate.write_predictions(path, labels, raw, {"val": val, "test": test})
    for split, calibrated in (("val", val), ("test", test)):
        y, p = evaluate.read_predictions(path, split)
        assert y.tolist() == labels[split].tolist()
        assert p.dtype == np.float64 and p.tolist() == calibrated.tolist()  # exact, not approximately
    written = pd.read_csv(path, float_precision="round_trip")
    assert written["probability"].tolist() == [*raw["val"], *raw["test"]]


def test_predictions_csv_keeps_columns_and_probabilities_exactly(tmp_path):
    rng = np.random.default_rng(0)
    val = np.concatenate([SPECIAL, rng.random(500)])
    test = np.concatenate([rng.random(1000) ** 20, SPECIAL])  # many small values too
    path = tmp_path / "predictions.csv"
    _round_trip(path, val, test)
    lines = path.read_text().splitlines()
    assert lines[0] == "split,index,label,probability,calibrated_probability" and len(lines) == 1 + len(val) + len(test)
    # Python's shortest exact form, as the file had before pandas wrote it.
    assert lines[1] == f"val,0,0,{float(val[-1])!r},0.1"
    assert lines[1 + len(val)] == f"test,0,0,0.5000000000000001,{float(test[0])!r}"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=50), st.lists(st.floats(0, 1), min_size=1, max_size=50))
def test_any_probabilities_survive_the_round_trip(tmp_path_factory, val, test):
    _round_trip(tmp_path_factory.mktemp("p") / "predictions.csv", np.array(val), np.array(test))


def test_a_broken_predictions_csv_is_one_clear_error(tmp_path):
    from pneumonia.errors import PipelineError

    path = tmp_path / "predictions.csv"
    for text in ("", "split,index\nval,0\n", "split,index,label,probability,calibrated_probability\ntest,0,1,0.5,oops\n",
                 "split,index,label,probability,calibrated_probability\ntest,0,7,0.5,0.5\n", '"unclosed\n'):
        path.write_text(text)
        with pytest.raises(PipelineError, match="rerun dvc repro evaluate"):
            evaluate.read_predictions(path, "test")
    with pytest.raises(PipelineError, match="cannot read"):
        evaluate.read_predictions(tmp_path / "missing.csv", "test")


def _run_evaluate(tmp_path, **evaluate_params):
    """evaluate.evaluate on synthetic logits (no model): over-confident, validation 74% pneumonia, test 62.5%."""
    from pneumonia import params as params_lib

    rng = np.random.default_rng(0)
    labels = {"val": (rng.random(524) < 0.74).astype(int), "test": np.repeat([0, 1], [234, 390])}
    logits = {s: 4.0 * (2 * y - 1) + rng.normal(0, 3.0, len(y)) + 1.0 for s, y in labels.items()}
    params = params_lib.for_stage(params_lib.from_dict({"evaluate": evaluate_params}), "evaluate")
    result = evaluate.evaluate((None, labels["val"]), (None, labels["test"]), logits["val"], logits["test"], params,
                               tmp_path / "metrics.json", tmp_path / "predictions.csv", tmp_path / "plots")
    return result, labels, logits, params


def test_evaluate_calibrates_for_the_stated_prevalence_and_predict_applies_the_same(tmp_path):
    import json

    from pneumonia import metrics, predict

    result, labels, logits, _ = _run_evaluate(tmp_path, prevalence=0.2, bootstrap={"samples": 40})
    cal = result["calibration"]
    scale, fitted = metrics.fit_calibration("platt", labels["val"], logits["val"])
    share = labels["val"].mean()
    assert cal["prevalence"] == 0.2 and cal["scale"] == scale
    assert cal["prevalence_shift"] == pytest.approx(np.log(0.2 / 0.8) - np.log(share / (1 - share)), abs=1e-12)
    assert cal["offset"] == fitted + cal["prevalence_shift"]
    # The CV folds are seeded 0, not by the run's seed (42 here), so runs of different seeds share them.
    assert cal["cv_nll"] == {m: round(metrics.cross_validated_nll(m, labels["val"], logits["val"], 5, 0), 4)
                             for m in metrics.CALIBRATIONS}
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    # predictions.csv holds the probabilities for 20%; predict reads back the scale and offset that give them.
    threshold, p_scale, p_offset = predict.read_operating_point(tmp_path / "metrics.json")
    for split in ("val", "test"):
        _, calibrated = evaluate.read_predictions(tmp_path / "predictions.csv", split)
        assert calibrated.tolist() == metrics.calibrate(logits[split], p_scale, p_offset).tolist()
    assert threshold == result["test"]["threshold"] and result["val"]["recall"] >= 0.95
    test = result["test"]
    assert test["ppv_at_prevalence"] == metrics.predictive_values(test)["ppv_at_prevalence"]
    assert set(test["npv_at_prevalence"]) == {"5pct", "20pct", "50pct"}
    assert {f"{m}_ci" for m in metrics.CI_METRICS} <= set(test)

    unshifted, *_ = _run_evaluate(tmp_path / "validation", prevalence="validation", bootstrap={"samples": 0})
    assert unshifted["calibration"]["prevalence"] == round(share, 4) and unshifted["calibration"]["prevalence_shift"] == 0
    assert unshifted["calibration"]["offset"] == fitted and "recall_ci" not in unshifted["test"]
    # A monotone shift moves the threshold with the scores: the same images are flagged.
    assert {k: unshifted["test"][k] for k in ("tp", "fp")} == {k: test[k] for k in ("tp", "fp")}


def test_model_card_states_the_prevalence_and_the_predictive_values(tmp_path):
    import json

    from conftest import ROOT
    from pneumonia import card

    record = json.loads((ROOT / "results/reference/scratch-64px-recipe/seed-42/model.json").read_text())
    provenance = {"source": "local", "path": "x.npz", "md5": "0" * 32,
                  "class_counts": {"test": {"normal": 234, "pneumonia": 390}}}
    result, _, _, params = _run_evaluate(tmp_path, prevalence=0.2, calibration="temperature", bootstrap={"samples": 20})
    text = card.render(result, params, record, provenance)
    test, cal = result["test"], result["calibration"]
    ppv, npv = test["ppv_at_prevalence"], test["npv_at_prevalence"]
    for key, shown in (("5pct", "5%"), ("20pct", "20%"), ("50pct", "50%")):
        assert f"| {shown} | {100 * ppv[key]:.1f}% | {100 * npv[key]:.1f}% |" in text
    assert "The test split is 62.5% pneumonia" in text
    assert f"Temperature scaling fitted on validation logits: T = {cal['temperature']}" in text
    assert "The probabilities are for a population with 20.0% pneumonia (evaluate.prevalence)" in text
    assert f"= {cal['prevalence_shift']:.4g}, so p = sigmoid({cal['scale']:.4g} * logit - {-cal['offset']:.4g})" in text
    assert "resamples of validation and test together" in text and "re-chooses the threshold" in text

    result, _, _, params = _run_evaluate(tmp_path / "platt", prevalence="validation", bootstrap={"samples": 0})
    text = card.render(result, params, record, provenance)
    assert f"Platt scaling fitted on validation logits: sigmoid({result['calibration']['scale']:.4g} * logit" in text
    assert "The probabilities are for validation's share of pneumonia" in text and "No bootstrap intervals" in text

    result, _, _, params = _run_evaluate(tmp_path / "default", bootstrap={"samples": 0})  # the default: even odds
    assert result["calibration"]["prevalence"] == 0.5
    assert "The probabilities are for a population with 50.0% pneumonia (evaluate.prevalence)" in \
        card.render(result, params, record, provenance)


def test_test_time_augmentation_is_recorded_for_predict_and_stated_in_the_model_card(tmp_path):
    import json

    from conftest import ROOT
    from pneumonia import card

    record = json.loads((ROOT / "results/reference/scratch-64px-recipe/seed-42/model.json").read_text())
    provenance = {"source": "local", "path": "x.npz", "md5": "0" * 32,
                  "class_counts": {"test": {"normal": 234, "pneumonia": 390}}}
    result, *_, params = _run_evaluate(tmp_path, tta=5, bootstrap={"samples": 0})
    # The views' seed and ranges: the evaluate stage's seed and augment's ranges (also with augment.enabled false).
    assert result["tta"] == {"views": 5, "seed": 42, "translate": 0.08, "rotate": 0.03, "zoom": 0.1, "contrast": 0.15}
    assert json.loads((tmp_path / "metrics.json").read_text())["tta"] == result["tta"]
    text = card.render(result, params, record, provenance)
    assert ("- Scoring: test-time augmentation (evaluate.tta 5): each validation and test logit is the mean over 5 views, "
            "the image and 4 fixed transformations drawn with the training augmentation's ranges (translation 0.08, "
            "rotation 0.03 turn, zoom 0.1, contrast 0.15; seed 42), the same for every image.") in text

    result, *_, params = _run_evaluate(tmp_path / "off", bootstrap={"samples": 0})
    assert result["tta"] == {"views": 1}
    assert "- Scoring: one logit per image, as it is (no test-time augmentation; evaluate.tta 1)." in \
        card.render(result, params, record, provenance)
