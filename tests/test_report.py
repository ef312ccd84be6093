"""python -m pneumonia.report: mean ± std of test metrics across experiments."""
import math
import sys

import pytest

from pneumonia import report
from pneumonia.errors import PipelineError


def _rev(name, test_metrics):
    """One experiment as DVC 3.67's `dvc exp show --json` gives it (trimmed to the fields read)."""
    metrics = ({"data": {"test": test_metrics, "val": {"recall": 0.5}}} if test_metrics is not None else
               {"error": {"type": "FileNotFoundError", "msg": "No such file or directory: 'metrics/metrics.json'"}})
    return {"executor": None, "name": name, "revs": [{
        "rev": "0" * 40, "name": name, "error": None,
        "data": {"rev": "...", "params": {"params.yaml": {"data": {"seed": 1}}},
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


def test_cli_prints_table_or_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(report, "exp_show", lambda: SHOWN)
    assert report.main(["seed-1", "seed-2", "seed-3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 experiment(s): seed-1, seed-2, seed-3"
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == len(report.METRICS)
    assert ["test.recall", "0.9500", "±", "0.0500", "3"] in rows
    assert ["test.pr_auc", "n/a", "±", "n/a", "0"] in rows
    assert report.main(["seed-2"]) == 0  # one experiment: no sample std
    assert ["test.recall", "0.9500", "±", "n/a", "1"] in [line.split() for line in capsys.readouterr().out.splitlines()]
    assert report.main(["seed-4"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown experiment seed-4; known: failed, seed-1, seed-2, seed-3"]


def test_real_dvc_without_experiments(repo):
    proc = repo.run(sys.executable, "-m", "pneumonia.report", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: no experiments found; run some first, e.g. dvc exp run -S seed=1"
