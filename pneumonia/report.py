"""Test metrics across experiments, e.g. one per seed: mean ± sample std, and their ensemble.

    dvc exp run -n seed-1 -S seed=1      (seed-2, seed-3, ... likewise)
    python -m pneumonia.report [--calibration] [EXPERIMENT ...]
    python -m pneumonia.report [--calibration] FOLDER ...   (runs kept as files: params.yaml, metrics.json,
                                                              predictions.csv; e.g. results/reference/.../seed-*)

With no names: every experiment of the current commit that has metrics, as `dvc exp show --json` lists
them. The experiments must be seeds of one recipe: their params.yaml may differ in `seed` only, and no two may
share a seed; otherwise the report names what differs and stops (pass the names of those that are). With two
or more, the ensemble is scored the way a single run is: the mean calibrated probability
across the experiments (each one's metrics/predictions.csv, read from its git ref), the threshold chosen
on the ensemble's validation scores with the experiments' own threshold rule, and the same test metrics
with bootstrap CIs that resample validation and test together (the threshold re-chosen in each replicate).

--calibration adds, for every calibration method (evaluate.calibration), each refitted on each experiment's
validation logits (recovered from its raw probabilities) and moved to the first experiment's
evaluate.prevalence: the 5-fold cross-validated NLL on validation, which is how the default is chosen,
and on test the NLL, expected calibration error and Brier score, as means over the experiments. Test is
reported, never used to choose.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pneumonia.errors import PipelineError

METRICS_FILE = "metrics/metrics.json"
PREDICTIONS_FILE = "metrics/predictions.csv"
METRICS = ("test.accuracy", "test.recall", "test.specificity", "test.precision", "test.f1", "test.roc_auc", "test.pr_auc",
           "test.threshold")


def exp_show() -> list:
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise PipelineError(f"dvc exp show failed: {lines[-1]}")
    return json.loads(proc.stdout)


def _rows(shown: list):
    """(experiment name, its row) for every experiment in `dvc exp show --json`."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                yield exp.get("name") or rev.get("name") or rev["rev"][:7], rev


def _file_data(rev: dict, kind: str, path: str):
    return (((rev.get("data") or {}).get(kind) or {}).get(path) or {}).get("data")


def experiments(shown: list) -> dict[str, dict | None]:
    """Experiment name -> the data of its metrics.json (None when it has none: failed, queued)."""
    return {name: _file_data(rev, "metrics", METRICS_FILE) for name, rev in _rows(shown)}


def revisions(shown: list) -> dict[str, tuple[str, dict]]:
    """Experiment name -> (its git revision, its params.yaml)."""
    return {name: (rev["rev"], _file_data(rev, "params", "params.yaml") or {}) for name, rev in _rows(shown)}


def predictions_at(rev: str) -> pd.DataFrame:
    """An experiment's metrics/predictions.csv, from its git ref (`dvc exp show` does not carry it)."""
    proc = subprocess.run(["git", "show", f"{rev}:{PREDICTIONS_FILE}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"cannot read {PREDICTIONS_FILE} of {rev[:7]} ({proc.stderr.strip().splitlines()[-1]})")
    return pd.read_csv(io.StringIO(proc.stdout), float_precision="round_trip")


def ensemble(tables: dict[str, pd.DataFrame], evaluate_params: dict, seed: int) -> dict:
    """The ensemble's test metrics: mean calibrated probability, threshold chosen on its validation scores."""
    from scipy.special import logit

    from pneumonia import metrics

    first = next(iter(tables.values()))
    for name, table in tables.items():
        if not table[["split", "index", "label"]].equals(first[["split", "index", "label"]]):
            raise PipelineError(f"experiment {name} was evaluated on other images or labels; an ensemble needs the same data")
    mean = np.mean([t["calibrated_probability"].to_numpy() for t in tables.values()], axis=0)
    val, test = (first["split"] == "val").to_numpy(), (first["split"] == "test").to_numpy()
    labels = first["label"].to_numpy()
    rule = {key: evaluate_params["threshold"][key] for key in ("strategy", "target_sensitivity", "value")}
    threshold = metrics.choose_threshold(labels[val], mean[val], **rule)
    result = metrics.binary_metrics(labels[test], mean[test], threshold)
    result |= metrics.predictive_values(result)
    if evaluate_params["bootstrap"]["samples"]:
        # The members' calibrations stay as fitted (the mean is the score); the threshold is re-chosen per replicate.
        scores = logit(mean)  # calibrate() with none gives the mean back (to an ulp), and 1.0 for a mean of 1.0 (inf)
        result |= metrics.bootstrap_ci((labels[val], scores[val]), (labels[test], scores[test]),
                                       evaluate_params["bootstrap"]["samples"], seed, **rule)
    return result


def compare_calibrations(tables: dict[str, pd.DataFrame], prevalence="validation") -> pd.DataFrame:
    """Method -> mean over experiments of its CV NLL on validation (the folds evaluate uses, seeded 0) and its
    test NLL, ECE and Brier score; each fit moved to `prevalence` (evaluate.prevalence) as evaluate moves it."""
    from scipy.special import logit
    from sklearn import metrics as skm

    from pneumonia import metrics

    rows = []
    for table in tables.values():
        val, test = table[table["split"] == "val"], table[table["split"] == "test"]
        # The raw probability is the sigmoid of the float64 logit: logit() gives it back (to ~1e-12), except past
        # about ±36.7, where the probability is 1 (or 0) to float64 precision; clipped, those logits read as ±34.5.
        val_logits, test_logits = (logit(np.clip(split["probability"].to_numpy(), 1e-15, 1 - 1e-15)) for split in (val, test))
        y_val, y_test = val["label"].to_numpy(), test["label"].to_numpy()
        for method in metrics.CALIBRATIONS:
            scale, offset = metrics.fit_calibration(method, y_val, val_logits)
            probs = metrics.calibrate(test_logits, scale, offset + metrics.prevalence_shift(prevalence, y_val))
            rows.append({"method": method,
                         "cv_nll_val": metrics.cross_validated_nll(method, y_val, val_logits),
                         "nll_test": skm.log_loss(y_test, np.clip(probs, 1e-12, 1 - 1e-12), labels=[0, 1]),
                         "ece_test": metrics.expected_calibration_error(y_test, probs),
                         "brier_test": skm.brier_score_loss(y_test, probs)})
    return pd.DataFrame(rows).groupby("method", sort=False).mean()


def _value(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def summarize(found: dict[str, dict | None], names: list[str]) -> tuple[list[str], pd.DataFrame]:
    """(the experiments used, a table of metric -> mean, sample std, count); every named one must have metrics."""
    if not found:
        raise PipelineError("no experiments found; run some first, e.g. dvc exp run -S seed=1")
    unknown = [n for n in names if n not in found]
    if unknown:
        raise PipelineError(f"unknown experiment {', '.join(unknown)}; known: {', '.join(sorted(found))}")
    no_metrics = [n for n in names if found[n] is None]
    if no_metrics:
        raise PipelineError(f"experiment {', '.join(no_metrics)} has no {METRICS_FILE} (failed or still queued?)")
    used = sorted(names or [n for n, data in found.items() if data is not None])
    if not used:
        raise PipelineError(f"no experiment has {METRICS_FILE} yet")
    # Experiments x metrics; a missing or non-numeric value (pr_auc is null with one class) is NaN and not counted.
    table = pd.DataFrame.from_dict(
        {n: {m: v for m in METRICS if _is_number(v := _value(found[n], m))} for n in used},
        orient="index", columns=list(METRICS), dtype=float,
    )
    stats = table.agg(["mean", "std", "count"]).T  # pandas' std is the sample std (ddof=1): NaN for one value
    return used, stats.astype({"count": int})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_seeds(params: dict[str, dict]) -> None:
    """Refuse experiments (name -> params.yaml) that are not seeds of one recipe: a mean ± std or an ensemble of
    an lr sweep would report a spread of recipes as the spread of one. Params other than seed must be equal, and
    the seeds distinct (a repeated seed is one run counted twice)."""
    flat = {name: pd.json_normalize(p).to_dict("records")[0] if p else {} for name, p in params.items()}  # dotted keys
    keys = sorted(set().union(*flat.values()) - {"seed"})
    differ = [k for k in keys if len({repr(f.get(k, "unset")) for f in flat.values()}) > 1]
    if differ:
        listed = "; ".join(f"{k} " + ", ".join(f"{n}={f.get(k, 'unset')}" for n, f in flat.items()) for k in differ)
        raise PipelineError(f"the experiments differ in more than seed ({listed}); pass names of experiments that "
                            "differ only by seed, e.g. python -m pneumonia.report seed-1 seed-2 seed-3")
    seeds = pd.Series({name: f.get("seed") for name, f in flat.items()})
    repeated = seeds[seeds.duplicated(keep=False)]
    if len(repeated):
        shared = "; ".join(f"{', '.join(group.index)} share seed {seed}" for seed, group in repeated.groupby(repeated))
        raise PipelineError(f"{shared}: runs of one seed, not seeds of one recipe; pass one experiment per seed")


def score_ensemble(shown: list, used: list[str], calibration: bool = False) -> tuple[dict | None, pd.DataFrame | None]:
    """The ensemble of `used` (two or more), and with `calibration` the methods compared (compare_calibrations).

    The experiments must be seeds of one recipe (check_seeds), so they share their evaluate params too.
    """
    revs = revisions(shown)
    return _score({n: revs[n][1] for n in used}, lambda n: predictions_at(revs[n][0]), used, calibration)


def _score(params: dict[str, dict], predictions, used: list[str], calibration: bool):
    """score_ensemble's work, from each run's params.yaml and `predictions(name)`, which reads its table."""
    check_seeds(params)
    tables = {n: predictions(n) for n in used} if len(used) > 1 or calibration else {}
    first = params[used[0]]
    prevalence = (first.get("evaluate") or {}).get("prevalence", "validation")
    compared = compare_calibrations(tables, prevalence) if calibration else None
    if len(used) < 2:
        return None, compared
    return ensemble(tables, first["evaluate"], first["seed"]), compared


FOLDER_FILES = ("params.yaml", "metrics.json", "predictions.csv")


def from_folders(folders: list[str], calibration: bool):
    """summarize and score_ensemble for runs kept as folders of FOLDER_FILES (results/reference/.../seed-<n>/):
    a clone has no experiments' git refs, yet reproduces their report from the committed files."""
    import yaml

    for folder in folders:
        missing = [f for f in FOLDER_FILES if not (Path(folder) / f).is_file()]
        if missing:
            raise PipelineError(f"{folder} has no {', '.join(missing)}; a run's folder holds {', '.join(FOLDER_FILES)}")
    used, stats = summarize({f: json.loads((Path(f) / "metrics.json").read_text()) for f in folders}, folders)
    params = {f: yaml.safe_load((Path(f) / "params.yaml").read_text()) or {} for f in used}
    combined, compared = _score(params, lambda f: pd.read_csv(Path(f) / "predictions.csv", float_precision="round_trip"),
                                used, calibration)
    return used, stats, combined, compared


def format_report(used: list[str], stats: pd.DataFrame, combined: dict | None = None) -> str:
    shown = pd.DataFrame({"mean": stats["mean"], "±": "±", "std": stats["std"], "n": stats["count"]})
    header = ["mean", "", "std", "n"]
    if combined is not None:
        shown["ensemble"] = [combined.get(m.split(".", 1)[1], np.nan) for m in stats.index]
        shown["95% CI"] = [" to ".join(f"{v:.4f}" for v in ci) if (ci := combined.get(m.split(".", 1)[1] + "_ci")) else ""
                           for m in stats.index]
        header += ["ensemble", "ensemble 95% CI"]
    table = shown.to_string(float_format="{:.4f}".format, na_rep="n/a", header=header)
    return f"{len(used)} experiment(s): {', '.join(used)}\n{table}"


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    calibration = "--calibration" in argv
    names = [a for a in argv if a != "--calibration"]
    if any(a.startswith("-") for a in names):
        print("usage: python -m pneumonia.report [--calibration] [EXPERIMENT ... | FOLDER ...]", file=sys.stderr)
        return 2
    try:
        names = list(dict.fromkeys(names))
        if names and all(Path(n).is_dir() for n in names):  # runs kept as folders, not experiments
            used, stats, combined, compared = from_folders(names, calibration)
        else:
            shown = exp_show()
            used, stats = summarize(experiments(shown), names)
            combined, compared = score_ensemble(shown, used, calibration)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(used, stats, combined))
    if compared is not None:
        print("\ncalibration methods, refitted on each experiment's validation logits (means over the experiments):")
        print(compared.to_string(float_format="{:.4f}".format,
                                 header=["5-fold CV NLL (val)", "NLL (test)", "ECE (test)", "Brier (test)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
