"""python -m pneumonia.report: mean ± std of test metrics across experiments."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from pneumonia import metrics, report
from pneumonia.params import Params, as_dict
from pneumonia.errors import PipelineError


EVALUATE = as_dict(Params().evaluate) | {"bootstrap": {"samples": 200}}


def _predictions(seed):
    """A predictions.csv table: the same images and labels for every seed, scores with independent noise."""
    labels = np.random.default_rng(0).integers(0, 2, 300)
    probs = np.clip(0.25 + 0.5 * labels + np.random.default_rng(seed).normal(0, 0.3, 300), 0, 1)
    return pd.DataFrame({"split": ["val"] * 100 + ["test"] * 200, "index": list(range(100)) + list(range(200)),
                         "label": labels, "probability": probs, "calibrated_probability": probs})


def _rev(name, test_metrics, seed=None, **params):
    """One experiment as DVC 3.67's `dvc exp show --json` gives it (trimmed to the fields read); seed N for seed-N."""
    metrics = ({"data": {"test": test_metrics, "val": {"recall": 0.5}}} if test_metrics is not None else
               {"error": {"type": "FileNotFoundError", "msg": "No such file or directory: 'metrics/metrics.json'"}})
    return {"executor": None, "name": name, "revs": [{
        "rev": name.ljust(40, "0"), "name": name, "error": None,
        "data": {"rev": "...", "params": {"params.yaml": {"data": {
            "seed": (int(name.removeprefix("seed-")) if name.startswith("seed-") else 0) if seed is None else seed, "lr": 1e-4, "evaluate": EVALUATE} | params}},
                 "metrics": {report.METRICS_FILE: metrics}, "deps": {}, "outs": {}, "meta": {}}}]}


def _metrics(recall, specificity, threshold):
    return {"recall": recall, "specificity": specificity, "precision": 0.9, "f1": 0.9, "roc_auc": 0.95,
            "pr_auc": None, "threshold": threshold, "recall_ci": [0.8, 1.0]}


WORKSPACE = {"rev": "workspace", "name": None, "data": {"metrics": {}}, "error": None, "experiments": None}
SHOWN = [WORKSPACE, {
    "rev": "b" * 40, "name": "main", "data": {"metrics": {}}, "error": None,
    "experiments": [_rev("seed-3", _metrics(1.00, 0.88, 0.5)), _rev("seed-2", _metrics(0.95, 0.84, 0.4)),
                    _rev("seed-1", _metrics(0.90, 0.80, 0.3)), _rev("failed", None)],
}]


def _row(stats, metric):
    return tuple(stats.loc[metric, ["mean", "std", "count"]])


def test_all_experiments_with_metrics_mean_and_sample_std():
    used, stats = report.summarize(report.experiments(SHOWN), [])
    assert used == ["seed-1", "seed-2", "seed-3"]  # "failed" has no metrics.json
    assert list(stats.index) == list(report.METRICS)
    assert _row(stats, "test.recall") == (pytest.approx(0.95), pytest.approx(0.05), 3)  # sample std: ddof=1
    assert _row(stats, "test.specificity") == (pytest.approx(0.84), pytest.approx(0.04), 3)
    assert _row(stats, "test.threshold") == (pytest.approx(0.4), pytest.approx(0.1), 3)
    assert _row(stats, "test.f1") == (pytest.approx(0.9), pytest.approx(0.0), 3)
    mean, std, count = _row(stats, "test.pr_auc")  # None in every experiment: no values
    assert math.isnan(mean) and math.isnan(std) and count == 0


def test_named_experiments_only():
    used, stats = report.summarize(report.experiments(SHOWN), ["seed-3", "seed-1"])
    assert used == ["seed-1", "seed-3"]
    assert _row(stats, "test.recall") == (pytest.approx(0.95), pytest.approx(0.0707107), 2)


def test_missing_or_non_numeric_values_are_not_counted():
    shown = [WORKSPACE, {**SHOWN[1], "experiments": [
        _rev("a", _metrics(0.9, 0.8, 0.5)), _rev("b", _metrics(0.7, "n/a", True)),
        _rev("c", {"recall": 0.8, "specificity": [0.8], "f1": 0.6})]}]
    used, stats = report.summarize(report.experiments(shown), [])
    assert _row(stats, "test.recall") == (pytest.approx(0.8), pytest.approx(0.1), 3)
    assert _row(stats, "test.f1") == (pytest.approx(0.8), pytest.approx(0.1732051), 3)
    assert _row(stats, "test.precision") == (pytest.approx(0.9), pytest.approx(0.0), 2)  # c has none
    mean, std, count = _row(stats, "test.specificity")  # one value: a mean, but no sample std
    assert (mean, count) == (pytest.approx(0.8), 1) and math.isnan(std)
    assert _row(stats, "test.threshold")[::2] == (pytest.approx(0.5), 1)  # True is not a threshold


@pytest.mark.parametrize("shown, names, message", [
    (SHOWN, ["seed-1", "nope"], "unknown experiment nope; known: failed, seed-1, seed-2, seed-3"),
    (SHOWN, ["failed"], "experiment failed has no metrics/metrics.json"),
    ([WORKSPACE, {**SHOWN[1], "experiments": None}], [], "no experiments found"),
    ([WORKSPACE, {**SHOWN[1], "experiments": [_rev("failed", None)]}], [], "no experiment has metrics/metrics.json"),
])
def test_bad_selection_is_a_pipeline_error(shown, names, message):
    with pytest.raises(PipelineError, match=message):
        report.summarize(report.experiments(shown), names)


def test_ensemble_scores_the_mean_probability_like_a_single_run():
    tables = {f"seed-{i}": _predictions(i) for i in (1, 2, 3)}
    result = report.ensemble(tables, EVALUATE, seed=1)
    labels = tables["seed-1"]["label"].to_numpy()
    mean = np.mean([t["calibrated_probability"] for t in tables.values()], axis=0)
    threshold = metrics.choose_threshold(labels[:100], mean[:100], "target_sensitivity", 0.95)  # on validation only
    assert result["threshold"] == threshold
    assert result["roc_auc"] == round(skm.roc_auc_score(labels[100:], mean[100:]), 4)
    assert result["tp"] == int(((mean[100:] >= threshold) & (labels[100:] == 1)).sum())
    assert result["roc_auc_ci"][0] <= result["roc_auc"] <= result["roc_auc_ci"][1]
    assert result["recall_ci"][0] <= result["recall"] <= result["recall_ci"][1]
    assert result["ppv_at_prevalence"] == metrics.predictive_values(result)["ppv_at_prevalence"]
    single = [skm.roc_auc_score(labels[100:], t["calibrated_probability"][100:]) for t in tables.values()]
    assert result["roc_auc"] > max(single)  # independent noise averages out
    other = _predictions(4)
    other.loc[0, "label"] = 1 - other.loc[0, "label"]
    with pytest.raises(PipelineError, match="other images or labels"):
        report.ensemble(tables | {"seed-4": other}, EVALUATE, seed=1)


def test_ensemble_bootstrap_reads_a_mean_probability_of_exactly_one_as_the_top_score():
    """Members sure of an image (calibrated probability 1.0 in float64) give a mean of 1.0, whose logit is inf: the
    bootstrap reads it as the top score, as it would the largest finite one, and its intervals stay finite."""
    tables = {f"seed-{i}": _predictions(i) for i in (1, 2, 3)}
    sure = {n: t.assign(calibrated_probability=t["calibrated_probability"].where(t["label"] == 0, 1.0)) for n, t in tables.items()}
    near = {n: t.assign(calibrated_probability=t["calibrated_probability"].clip(upper=1 - 1e-15)) for n, t in sure.items()}
    result, clipped = report.ensemble(sure, EVALUATE, seed=1), report.ensemble(near, EVALUATE, seed=1)
    assert result["threshold"] == 1.0  # every positive is sure here: chosen at the top score, which differs
    assert {k: v for k, v in result.items() if k != "threshold"} == {k: v for k, v in clipped.items() if k != "threshold"}
    assert all(np.isfinite(result[f"{m}_ci"]).all() for m in metrics.CI_METRICS)


def test_cli_prints_table_or_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(report, "exp_show", lambda: SHOWN)
    monkeypatch.setattr(report, "predictions_at", lambda rev: _predictions(int(rev[5])))
    assert report.main(["seed-1", "seed-2", "seed-3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 experiment(s): seed-1, seed-2, seed-3"
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == len(report.METRICS)
    assert "ensemble" in lines[1]
    combined = report.ensemble({n: _predictions(int(n[-1])) for n in ("seed-1", "seed-2", "seed-3")}, EVALUATE, 1)
    low, high = combined["recall_ci"]
    assert ["test.recall", "0.9500", "±", "0.0500", "3", f"{combined['recall']:.4f}", f"{low:.4f}", "to",
            f"{high:.4f}"] in rows
    assert ["test.pr_auc", "n/a", "±", "n/a", "0"] in [row[:5] for row in rows]
    assert report.main(["seed-2"]) == 0  # one experiment: no sample std
    assert ["test.recall", "0.9500", "±", "n/a", "1"] in [line.split() for line in capsys.readouterr().out.splitlines()]
    assert report.main(["seed-4"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown experiment seed-4; known: failed, seed-1, seed-2, seed-3"]


def test_runs_kept_as_folders_report_as_their_experiments_do(tmp_path, monkeypatch, capsys):
    """results/reference keeps each run's params.yaml, metrics.json and predictions.csv: the same report, with no
    experiment refs (a fresh clone has none)."""
    import yaml

    def table(seed):  # inside (0, 1), so the calibration methods can recover logits
        scored = _predictions(seed)
        return scored.assign(probability=scored["probability"].clip(0.01, 0.99),
                             calibrated_probability=scored["calibrated_probability"].clip(0.01, 0.99))

    monkeypatch.setattr(report, "exp_show", lambda: SHOWN)
    monkeypatch.setattr(report, "predictions_at", lambda rev: table(int(rev[5])))
    assert report.main(["--calibration", "seed-1", "seed-2", "seed-3"]) == 0
    from_refs = capsys.readouterr().out.splitlines()
    revs = report.revisions(SHOWN)
    folders = []
    for name, data in report.experiments(SHOWN).items():
        if data is not None:
            folder = tmp_path / name
            folder.mkdir()
            (folder / "params.yaml").write_text(yaml.safe_dump(revs[name][1]))
            (folder / "metrics.json").write_text(json.dumps(data))
            table(int(name[-1])).to_csv(folder / "predictions.csv", index=False)
            folders.append(str(folder))
    monkeypatch.setattr(report, "exp_show", lambda: pytest.fail("folders need no dvc exp show"))
    assert report.main(["--calibration", *folders]) == 0
    from_folders = capsys.readouterr().out.splitlines()
    assert from_folders[0] == f"3 experiment(s): {', '.join(sorted(folders))}"
    assert from_folders[1:] == from_refs[1:] and len(from_refs) > len(report.METRICS) + 5  # with calibration rows

    (tmp_path / "seed-2" / "predictions.csv").unlink()
    assert report.main(folders) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'seed-2'} has no predictions.csv; a run's folder holds params.yaml, metrics.json, "
        "predictions.csv"]


def test_experiments_that_are_not_seeds_of_one_recipe_are_refused_in_one_line(monkeypatch, capsys):
    found = _metrics(0.9, 0.8, 0.3)
    sweep = [WORKSPACE, {**SHOWN[1], "experiments": [
        _rev("seed-1", found), _rev("seed-2", found), _rev("rerun-2", found, seed=2),
        _rev("lr-low", found, seed=3, lr=1e-5, evaluate=EVALUATE | {"calibration": "none"})]}]
    read = []
    monkeypatch.setattr(report, "exp_show", lambda: sweep)
    monkeypatch.setattr(report, "predictions_at", lambda rev: read.append(rev) or _predictions(int(rev[5])))
    assert report.main([]) == 1  # every experiment of the commit: an lr and calibration sweep is not a seed spread
    assert capsys.readouterr().err.splitlines() == [
        "error: the experiments differ in more than seed (evaluate.calibration lr-low=none, rerun-2=platt, seed-1=platt, "
        "seed-2=platt; lr lr-low=1e-05, rerun-2=0.0001, seed-1=0.0001, seed-2=0.0001); pass names of experiments that "
        "differ only by seed, e.g. python -m pneumonia.report seed-1 seed-2 seed-3"]
    assert report.main(["--calibration", "seed-2", "rerun-2", "seed-1"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: rerun-2, seed-2 share seed 2: runs of one seed, not seeds of one recipe; pass one experiment per seed"]
    assert read == []  # refused before any predictions.csv is read
    assert report.main(["seed-1", "seed-2"]) == 0
    assert capsys.readouterr().out.startswith("2 experiment(s): seed-1, seed-2\n") and len(read) == 2
    assert report.main(["lr-low"]) == 0  # one experiment is one recipe


def test_real_experiments_are_summarised_only_as_seeds_of_one_recipe(trained_repo):
    """Experiments as `dvc exp save` records them: params.yaml edited, the trained run's outputs kept (no rerun)."""
    repo = trained_repo
    predictions = repo.path / report.PREDICTIONS_FILE
    plain = pd.read_csv(predictions, float_precision="round_trip")
    half = plain.assign(calibrated_probability=plain["calibrated_probability"] / 2)  # a less confident "seed"
    for name, params, table in (("seed-1", {"seed": 1}, plain), ("seed-2", {"seed": 2}, half),
                                ("slow-head", {"seed": 3, "lr": 1e-5}, plain), ("again", {"seed": 2, "lr": 1e-4}, plain)):
        repo.set_params(params)
        table.to_csv(predictions, index=False)
        repo.dvc("exp", "save", "-n", name)

    proc = repo.run(sys.executable, "-m", "pneumonia.report", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: the experiments differ in more than seed (lr again=0.0001, seed-1=0.0001, seed-2=0.0001, "
        "slow-head=1e-05); pass names of experiments that differ only by seed, e.g. python -m pneumonia.report "
        "seed-1 seed-2 seed-3"]
    proc = repo.run(sys.executable, "-m", "pneumonia.report", "again", "seed-2", check=False)
    assert (proc.returncode, proc.stderr.splitlines()) == (1, [
        "error: again, seed-2 share seed 2: runs of one seed, not seeds of one recipe; pass one experiment per seed"])

    # Seeds of one recipe: the ensemble of the predictions each experiment's git ref holds.
    proc = repo.run(sys.executable, "-m", "pneumonia.report", "seed-2", "seed-1")
    assert proc.stdout.splitlines()[0] == "2 experiment(s): seed-1, seed-2"
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
    val, test = plain["split"] == "val", plain["split"] == "test"
    mean = (plain["calibrated_probability"] + half["calibrated_probability"]) / 2
    threshold = metrics.choose_threshold(plain.loc[val, "label"], mean[val], "target_sensitivity", 0.95)  # on validation
    own = json.loads((repo.path / report.METRICS_FILE).read_text())["test"]["threshold"]
    assert rows["test.threshold"][5] == f"{threshold:.4f}" != f"{own:.4f}"  # both refs read, not one
    assert rows["test.roc_auc"][5] == f"{round(skm.roc_auc_score(plain.loc[test, 'label'], mean[test]), 4):.4f}"

    # make ensemble is this report with the calibration comparison (the venv given, as it is not in the copy).
    venv = Path(sys.executable).parent.parent
    made = repo.run("make", "-s", "-o", f"{venv}/.runtime", f"VENV={venv}", "ensemble", "EXPS=seed-2 seed-1")
    direct = repo.run(sys.executable, "-m", "pneumonia.report", "--calibration", "seed-1", "seed-2")
    assert made.stdout == direct.stdout and "calibration methods" in made.stdout


def test_real_dvc_without_experiments(repo):
    proc = repo.run(sys.executable, "-m", "pneumonia.report", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: no experiments found; run some first, e.g. dvc exp run -S seed=1"


def _logit_predictions(seed):
    """predictions.csv as evaluate writes it: raw = sigmoid(logit), over-confident, with validation's class mix."""
    from scipy.special import expit

    rng = np.random.default_rng(seed)
    labels = np.r_[rng.random(200) < 0.74, rng.random(300) < 0.62].astype(int)
    logits = 3.0 * (2 * labels - 1) + rng.normal(0, 2.5, 500) + 1.5
    return pd.DataFrame({"split": ["val"] * 200 + ["test"] * 300, "index": list(range(200)) + list(range(300)),
                         "label": labels, "probability": expit(logits), "calibrated_probability": expit(logits / 2)})


def test_calibration_methods_are_compared_refitted_on_validation_only(monkeypatch, capsys):
    from scipy.special import expit, logit

    tables = {f"seed-{i}": _logit_predictions(i) for i in (1, 2)}
    compared = report.compare_calibrations(tables)
    assert list(compared.index) == list(metrics.CALIBRATIONS)
    expected = []
    for table in tables.values():
        val, test = table[table["split"] == "val"], table[table["split"] == "test"]
        scale, offset = metrics.fit_calibration("platt", val["label"], logit(val["probability"]))  # validation only
        probs = expit(scale * logit(test["probability"].to_numpy()) + offset)
        expected.append((metrics.cross_validated_nll("platt", val["label"].to_numpy(), logit(val["probability"]), 5, 0),
                         metrics.expected_calibration_error(test["label"], probs), skm.brier_score_loss(test["label"], probs)))
    np.testing.assert_allclose(compared.loc["platt", ["cv_nll_val", "ece_test", "brier_test"]], np.mean(expected, axis=0))
    raw_ece = np.mean([metrics.expected_calibration_error(t[t["split"] == "test"]["label"], t[t["split"] == "test"]["probability"])
                       for t in tables.values()])
    assert compared.loc["none", "ece_test"] == pytest.approx(raw_ece)
    assert compared.loc["temperature", "cv_nll_val"] < compared.loc["none", "cv_nll_val"]  # over-confident: T helps
    # At a stated prevalence each fit is moved as evaluate moves it; the validation comparison does not change.
    at_half = report.compare_calibrations(tables, prevalence=0.5)
    shifted = []
    for table in tables.values():
        val, test = table[table["split"] == "val"], table[table["split"] == "test"]
        scale, offset = metrics.fit_calibration("platt", val["label"], logit(val["probability"]))
        offset += metrics.prevalence_shift(0.5, val["label"].to_numpy())
        shifted.append(skm.brier_score_loss(test["label"], metrics.calibrate(logit(test["probability"]), scale, offset)))
    assert at_half.loc["platt", "brier_test"] == pytest.approx(np.mean(shifted))
    assert at_half.loc["platt", "brier_test"] != pytest.approx(compared.loc["platt", "brier_test"])
    assert at_half["cv_nll_val"].tolist() == compared["cv_nll_val"].tolist()

    monkeypatch.setattr(report, "exp_show", lambda: SHOWN)
    monkeypatch.setattr(report, "predictions_at", lambda rev: _logit_predictions(int(rev[5])))
    assert report.main(["--calibration", "seed-1"]) == 0
    out = capsys.readouterr().out
    assert "calibration methods, refitted on each experiment's validation logits" in out
    assert [line.split()[0] for line in out.splitlines()[-3:]] == list(metrics.CALIBRATIONS)


def test_calibration_comparison_reads_a_probability_of_exactly_one_as_a_large_logit():
    """A logit past ~36.7 is written as probability 1.0 (float64): compared as the largest logit a CSV keeps."""
    table = _logit_predictions(1)
    table.loc[[0, 1], "probability"] = [1.0, 0.0]  # validation rows
    near = table.assign(probability=table["probability"].clip(1e-15, 1 - 1e-15))
    pd.testing.assert_frame_equal(report.compare_calibrations({"seed-1": table}),
                                  report.compare_calibrations({"seed-1": near}))
    assert np.isfinite(report.compare_calibrations({"seed-1": table}).to_numpy()).all()


def test_calibration_comparison_uses_the_experiments_stated_prevalence(monkeypatch):
    stated = _rev("seed-1", _metrics(0.9, 0.8, 0.3))
    stated["revs"][0]["data"]["params"]["params.yaml"]["data"]["evaluate"] = EVALUATE | {"prevalence": 0.5}
    monkeypatch.setattr(report, "predictions_at", lambda rev: _logit_predictions(int(rev[5])))
    _, compared = report.score_ensemble([WORKSPACE, {**SHOWN[1], "experiments": [stated]}], ["seed-1"], calibration=True)
    expected = report.compare_calibrations({"seed-1": _logit_predictions(1)}, prevalence=0.5)
    pd.testing.assert_frame_equal(compared, expected)


@pytest.mark.parametrize("report_file", ["report.txt", "report-with-check.txt"])
def test_the_shipped_recipes_committed_reports_are_what_the_report_prints_from_their_folders(report_file, monkeypatch, capsys):
    """The README's numbers for the shipped recipe come from these files: a clone recomputes them exactly."""
    from conftest import ROOT

    monkeypatch.chdir(ROOT)  # the first line names the folders from the repository root
    committed = (ROOT / "results/reference/scratch-64px-recipe/long-schedule" / report_file).read_text()
    folders = committed.splitlines()[0].split(": ", 1)[1].split(", ")
    assert len(folders) == (4 if "check" in report_file else 3) and all((ROOT / f / "predictions.csv").is_file() for f in folders)
    assert report.main(["--calibration", *folders]) == 0
    assert capsys.readouterr().out == committed
