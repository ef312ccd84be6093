"""The real DVC CLI on a temporary git copy of the project, tiny settings, synthetic data."""
import csv
import io
import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

import synthetic
from conftest import PROGRESS, ROOT

METRIC_KEYS = {"accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc", "loss",
               "tp", "fp", "tn", "fn", "threshold"}


# TensorFlow's C++ start-up chatter, which stages must not print (pneumonia/__init__.py).
CHATTER = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "cuInit")
SIZES = synthetic.PIPELINE_SIZES  # the split sizes of the tiny projects' data


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def _skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '(\w+)' didn't change, skipping", output))


def test_repro_experiments_metrics_and_plots(trained_repo):
    repo = trained_repo
    assert _ran(repo.repro_output) == {"download", "resize", "train_head", "fine_tune", "evaluate", "error_analysis"}
    p = repo.path
    metrics = json.loads((p / "metrics/metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics["test"]) and METRIC_KEYS <= set(metrics["test_at_0.5"])
    assert metrics["test"]["tp"] + metrics["test"]["fn"] + metrics["test"]["tn"] + metrics["test"]["fp"] == SIZES["test"]
    assert metrics["test"]["roc_auc"] > 0.7  # the synthetic signal is easy
    low, high = metrics["test"]["recall_ci"]
    assert low <= metrics["test"]["recall"] <= high
    assert {"method", "scale", "offset", "temperature", "ece_before", "ece_after", "brier_before",
            "brier_after"} <= set(metrics["calibration"])
    assert metrics["calibration"]["method"] == "platt" and metrics["calibration"]["temperature"] is None
    assert set(metrics["calibration"]["cv_nll"]) == {"none", "temperature", "platt"}
    predictions = (p / "metrics/predictions.csv").read_text().splitlines()
    assert predictions[0] == "split,index,label,probability,calibrated_probability" and len(predictions) == 1 + SIZES["val"] + SIZES["test"]
    for png in ("figures/roc.png", "figures/confusion_matrix.png", "figures/precision_recall.png", "figures/reliability.png",
                "errors/false_negatives.png", "errors/false_positives.png", "errors/random_samples.png",
                "errors/gradcam_summary.png"):
        assert (p / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    with open(p / "reports/errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert errors and "heat_outside_lung" in errors[0] and any(r["heat_outside_lung"] for r in errors)
    card = (p / "reports/model_card.md").read_text()
    assert f"{metrics['test']['threshold']:.4f}" in card and "Known limitations" in card
    # Says truthfully what trained: the tiny run keeps the random early blocks frozen (unfreeze_from conv5_block1).
    assert ("conv5_block1 to conv5_block3 and the head train; conv1 to conv4_block6 stay frozen with random weights "
            "(never trained); BatchNorm trains too") in card
    assert "conv5_block1 to conv5_block3 and the head train" in repo.repro_output
    assert json.loads((p / "dvclive/train_head/metrics.json").read_text())["step"] == 0
    _quiet_with_progress(repo)
    assert (p / "models/model.keras").stat().st_size > 1_000_000
    assert "models/model.keras" not in repo.git("ls-files").stdout  # a DVC output, not a git file

    _predict_new_files(repo)

    shown = json.loads(repo.dvc("metrics", "show", "--json").stdout)
    workspace = shown[""]["data"]["metrics/metrics.json"]["data"]  # "" is the workspace
    assert workspace["test"]["roc_auc"] == metrics["test"]["roc_auc"]

    assert "dvc.lock" in repo.git("ls-files").stdout  # the baseline run is committed

    # (An evaluate param reruns evaluate and error_analysis only: tests/test_queue_and_remote.py's sweep.)
    # A param only error_analysis reads reruns only error_analysis, and the model card (evaluate's) stays as it is.
    card = (p / "reports/model_card.md").read_text()
    out = repo.dvc("exp", "run", "-n", "cases6", "-S", "error_analysis.cases=6").stdout
    assert _ran(out) == {"download", "error_analysis"}
    assert {"resize", "train_head", "fine_tune", "evaluate"} <= _skipped(out)
    assert (p / "reports/model_card.md").read_text() == card and "cases" not in card
    # (Which stages each param reruns, for every param: tests/test_dvc_yaml.py, against the code that reads it.)

    # The learning rate as users type it; DVC writes 1e-05 into params.yaml.
    out = repo.dvc("exp", "run", "-n", "slow-head", "-S", "lr=1e-5").stdout
    assert _ran(out) == {"download", "train_head", "fine_tune", "evaluate", "error_analysis"}
    assert "resize" in _skipped(out)  # download runs every time (it checks the source's content) and rewrote nothing
    assert "lr: 1e-05" in (p / "params.yaml").read_text()
    diff = json.loads(repo.dvc("metrics", "diff", "--all", "--json").stdout)["metrics/metrics.json"]
    assert {"test.roc_auc", "test.recall", "test.specificity"} <= set(diff)
    assert any(v.get("diff") for v in diff.values())  # a 10x smaller head lr changes something (strings have no "diff")
    params_diff = json.loads(repo.dvc("params", "diff", "--json").stdout)
    assert params_diff["params.yaml"]["lr"]["new"] == 1e-05

    exp_vs_exp = json.loads(repo.dvc("metrics", "diff", "slow-head", "cases6", "--json").stdout)
    assert any(v.get("diff") for v in exp_vs_exp["metrics/metrics.json"].values())  # two experiments' lr apart
    commit_vs_exp = repo.dvc("metrics", "diff", "--all", "HEAD", "slow-head").stdout
    assert "test.roc_auc" in commit_vs_exp and "metrics/metrics.json" in commit_vs_exp

    table = json.loads(repo.dvc("exp", "show", "--json").stdout)
    assert {"slow-head", "cases6"} <= set(re.findall(r'"name": "([\w-]+)"', json.dumps(table)))
    _readable_exp_show(repo, {"slow-head", "cases6"}, {"lr", "error_analysis.cases"})

    plots = json.loads(repo.dvc("plots", "show", "--json").stdout)["data"]
    ids = set(plots)
    for wanted in ("ROC", "Precision-Recall", "Confusion", "Calibration"):
        assert wanted in ids, ids
    assert any(i.endswith("confusion_matrix.png") for i in ids)
    assert "plots/errors/gradcam_summary.png" in ids
    _training_curves(plots, "workspace")
    _training_curves(json.loads(repo.dvc("plots", "diff", "slow-head", "cases6", "--json").stdout)["data"],
                     "slow-head", "cases6")  # two experiments' curves overlaid
    assert plots["ROC"][0]["type"] == "vega"
    roc_points = plots["ROC"][0]["content"]["data"]["values"]
    assert len(roc_points) > 2 and all(0 <= r["fpr"] <= 1 and 0 <= r["tpr"] <= 1 for r in roc_points)


def _quiet_with_progress(repo):
    """Every stage's stderr: no TensorFlow chatter; progress where it waits, at most a line per tenth."""
    errors = repo.repro_errors
    assert not [c for c in CHATTER if c in errors], errors[-3000:]
    # Nothing else either, DVC's warnings included (it warned about an empty stages/__init__.py).
    assert not [line for line in errors.splitlines() if line and not PROGRESS.match(line)], errors[-3000:]
    progress = {}
    for line in errors.splitlines():
        if m := PROGRESS.match(line):
            progress.setdefault(m[1], []).append((int(m[2]), int(m[3]), m[4]))
    # Train and validation images through the frozen prefix, once in each training stage.
    both = SIZES["train"] + SIZES["val"]
    assert progress["caching train+val activations"][-1] == (both, both, "images")
    assert progress["predicting val"][-1] == (SIZES["val"], SIZES["val"], "images")
    assert progress["predicting test"][-1] == (SIZES["test"], SIZES["test"], "images")
    assert progress["bootstrap"][-1] == (50, 50, "resamples")
    assert progress["Grad-CAM"][-1][0] == progress["Grad-CAM"][-1][1] > 0
    for label, lines in progress.items():
        if label != "caching train+val activations":  # that one runs once per training stage
            assert len(lines) <= 10 and [d for d, _, _ in lines] == sorted({d for d, _, _ in lines}), label

    # (PNEUMONIA_TF_LOGS=1 bringing the chatter back: tests/test_output.py, on the real TensorFlow.)


def _readable_exp_show(repo, names: set[str], changed: set[str]):
    """The README's `dvc exp show` (`make exps` runs it) fits 120 columns and shows each experiment's numbers uncut."""
    commands = re.findall(r"^(dvc exp show --.*?)\s*$", (ROOT / "README.md").read_text(), re.M)
    assert len(commands) == 1, commands
    # --no-print-directory: under `make test` this make is nested and would add "Leaving directory" lines
    dry_run = repo.run("make", "--no-print-directory", "-n", "exps").stdout
    assert dry_run.strip().splitlines()[-1] == f".venv/bin/{commands[0]}"
    args = shlex.split(commands[0])[1:]
    shown = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo.path, capture_output=True, text=True,
                           env=repo.env | {"COLUMNS": "120"}, check=True).stdout
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120, shown
    kept = ["test.recall", "test.specificity", "test.f1", "test.roc_auc"]  # sensitivity, specificity, F1, AUC
    header = next(line for line in lines if "Experiment" in line).split()
    assert header[1:5] == kept and "lr" in header, shown
    # The same table as CSV holds every cell in full: the 4 metrics and the changed params, nothing else.
    rows = list(csv.DictReader(io.StringIO(repo.dvc(*args, "--csv").stdout)))
    all_params = set(json.loads(repo.dvc("params", "diff", "--all", "--json").stdout)["params.yaml"])
    assert set(rows[0]) - {"Experiment", "rev", "typ"} == set(kept) | changed and changed <= all_params
    for row in rows:
        if row["Experiment"] in names:
            cells = next(line for line in lines if f"[{row['Experiment']}]" in line).split()
            after_name = cells[cells.index(f"[{row['Experiment']}]") + 1 :][: len(kept)]
            assert not [c for c in after_name if "…" in c], shown
            assert [float(c) for c in after_name] == [float(row[metric]) for metric in kept], shown  # 1.0 shows as 1
    assert names <= {row["Experiment"] for row in rows}


def _training_curves(plots: dict, *revs: str):
    """One plot per phase and training metric, train and validation series in it, for each rev."""
    assert not [i for i in plots if "dvclive" in i]  # DVCLive's one-file plots are not listed
    for phase in ("Head", "Fine-tune"):
        for metric, label in (("loss", "loss"), ("auc", "AUC"), ("accuracy", "accuracy")):
            values = plots[f"{phase} {label}"][0]["content"]["data"]["values"]
            series = {(v["rev"], v["filename"]) for v in values}
            assert series == {(rev, f"{split}/{metric}.tsv") for rev in revs for split in ("train", "eval")}, series
            assert all(0 <= float(v[metric]) for v in values) and all(float(v[metric]) <= 1 for v in values
                                                                       if metric != "loss")


def _predict_new_files(repo):
    """pneumonia.predict with the trained model: two test images as PNGs, one broken file."""
    with np.load(repo.path / "data/raw/pneumoniamnist.npz") as npz:
        images = npz["test_images"][:2]
    outside = repo.path.parent  # not in the git checkout
    pngs = [outside / f"test{i}.png" for i in range(2)]
    for png, image in zip(pngs, images):
        Image.fromarray(image).save(png)
    broken = outside / "broken.png"
    broken.write_bytes(b"not a PNG at all")
    proc = repo.run(sys.executable, "-m", "pneumonia.predict", *map(str, [*pngs, broken]), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert not [c for c in CHATTER if c in proc.stderr], proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["file"] for r in rows] == list(map(str, [*pngs, broken]))
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and str(broken) in error_lines[0]
    assert rows[2]["error"] and rows[2]["probability"] == ""
    # Same preprocessing and calibration as the pipeline: the evaluate stage's probabilities (batching may move the last bits).
    with open(repo.path / "metrics/predictions.csv", newline="") as f:
        expected = [float(r["calibrated_probability"]) for r in csv.DictReader(f) if r["split"] == "test"][:2]
    threshold = json.loads((repo.path / "metrics/metrics.json").read_text())["test"]["threshold"]
    for row, probability in zip(rows[:2], expected):
        assert row["error"] == "" and float(row["threshold"]) == threshold
        assert float(row["probability"]) == pytest.approx(probability, abs=1e-6)
        assert row["decision"] == ("pneumonia" if float(row["probability"]) >= threshold else "normal")


def test_bad_input_stops_with_one_line_and_no_output(repo):
    repo.dvc("repro", "download")
    raw = repo.path / "data/raw/pneumoniamnist.npz"
    good = raw.read_bytes()

    broken = repo.path.parent / "broken.npz"
    broken.write_bytes(good[: len(good) // 2])
    for source, message in ((repo.path / "missing.npz", "missing.npz does not exist"), (broken, "is truncated")):
        repo.set_params({"data": {"source": str(source)}})
        proc = repo.dvc("repro", "download", check=False)
        assert proc.returncode != 0
        assert "error: data:" in proc.stderr and message in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert raw.read_bytes() == good  # the data already there is untouched
        assert sorted(p.name for p in raw.parent.iterdir()) == ["pneumoniamnist.npz", "provenance.json"]

    repo.set_params({"lr": -0.1})
    proc = repo.run("python", "-m", "stages.train_head", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: params: lr is -0.1; it must be in (0, 1]"

    repo.set_params({"lr": 1e-4})
    proc = repo.run("python", "-m", "stages.evaluate", check=False)  # nothing trained yet
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "models/model.keras" in proc.stderr and "dvc repro" in proc.stderr


def test_native_resolution_file_is_kept_as_is_and_a_size_mismatch_is_one_line(repo):
    """data.size 64 with MedMNIST+'s layout at 64 px, through dvc repro: resize keeps the pixels when image_size is
    64, and the same file under data.size 28 stops with one line naming both sizes, the data in place untouched."""
    npz64 = synthetic.write(repo.path.parent / "pneumoniamnist_64.npz", size=64, sizes=synthetic.PIPELINE_SIZES)
    repo.set_params({"data": {"source": str(npz64), "size": 64}, "image_size": 64})
    proc = repo.dvc("repro", "resize")
    assert "64x64 -> 64x64 (kept, already at image_size)" in proc.stdout
    raw = np.load(npz64)
    for split in ("train", "val", "test"):
        with np.load(repo.path / "data" / "resized" / f"{split}.npz") as resized:
            np.testing.assert_array_equal(resized["images"], raw[f"{split}_images"])
    assert json.loads((repo.path / "data/resized/record.json").read_text())["resize"]["data.size"] == 64
    assert json.loads((repo.path / "data/raw/provenance.json").read_text())["size"] == 64

    kept = (repo.path / "data/raw/pneumoniamnist.npz").read_bytes()
    repo.set_params({"data": {"size": 28}})
    proc = repo.dvc("repro", "resize", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    assert (f"error: data: {npz64} holds 64x64 images but data.size is 28; set data.size=64 or use the 28 px file"
            in proc.stderr)
    assert (repo.path / "data/raw/pneumoniamnist.npz").read_bytes() == kept
