"""python -m pneumonia.export: a SavedModel that gives the .keras model's probabilities and predict's decisions."""
import csv
import io
import json
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from scipy.special import expit

import synthetic
from conftest import ROOT
from pneumonia import export, predict, train
from pneumonia import model as model_lib
from pneumonia.data import load_split

SIZE = 32
SCALE, OFFSET = 0.7, -0.4


@pytest.fixture(scope="module")
def images():
    """Six test images (28 px) and the model's input made from them (32 px, as the resize stage does)."""
    sources = synthetic.make_arrays()["test_images"][:6]
    return sources, predict.preprocess(sources, SIZE, "bilinear")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, images):
    """A tiny saved model, and a metrics.json with Platt calibration whose threshold splits the six images."""
    root = tmp_path_factory.mktemp("tiny")
    keras.utils.set_random_seed(0)
    net = model_lib.build(SIZE, "none", dropout=0.2)
    train.save(net, root / "model.keras")
    logits = model_lib.logits_model(net).predict(images[1], verbose=0).reshape(-1).astype("float64")
    threshold = float(np.median(expit(SCALE * logits + OFFSET)))
    (root / "metrics.json").write_text(json.dumps({"test": {"threshold": threshold}, "calibration": {
        "method": "platt", "scale": SCALE, "offset": OFFSET, "temperature": None}}))
    return root


def _export(root, output, capsys, **paths):
    paths = {"model": root / "model.keras", "metrics": root / "metrics.json"} | paths
    status = export.main(["--model", str(paths["model"]), "--metrics", str(paths["metrics"]), "--output", str(output)])
    out, err = capsys.readouterr()
    return status, out, err


def _serve(path, pixels) -> dict:
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    return {k: v.numpy() for k, v in signature(pixels=tf.constant(pixels)).items()}


@pytest.mark.slow  # over 10 s: make test only
def test_export_gives_the_keras_probabilities_and_predicts_calibration_and_decision(tiny, images, tmp_path, capsys,
                                                                                     monkeypatch):
    sources, pixels = images
    status, out, err = _export(tiny, tmp_path / "serving", capsys)
    assert status == 0 and out == f"export: wrote {tmp_path / 'serving'} (signature serve: uint8 pixels (N, 32, 32, 1) " \
                                  "-> probability, calibrated_probability, pneumonia)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving"]  # no temporary folder left beside it

    signature = tf.saved_model.load(str(tmp_path / "serving")).signatures["serving_default"]
    assert signature.structured_input_signature[1]["pixels"] == tf.TensorSpec((None, SIZE, SIZE, 1), tf.uint8, "pixels")
    served = _serve(tmp_path / "serving", pixels)
    keras_probability = model_lib.load(tiny / "model.keras").predict(pixels, verbose=0).reshape(-1)
    np.testing.assert_allclose(served["probability"], keras_probability, rtol=1e-5, atol=1e-7)
    assert len(set(served["probability"].round(6))) > 1  # distinct images give distinct probabilities

    # The same calibrated probability and decision as pneumonia.predict with this metrics.json.
    npz = tmp_path / "images.npz"
    np.savez(npz, test_images=sources)
    assert predict.main([str(npz), "--model", str(tiny / "model.keras"), "--metrics", str(tiny / "metrics.json"),
                         "--params", str(ROOT / "params.yaml")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    np.testing.assert_allclose(served["calibrated_probability"], [float(r["probability"]) for r in rows], rtol=1e-6)
    assert [r["decision"] for r in rows] == ["pneumonia" if d else "normal" for d in served["pneumonia"]]
    assert 0 < served["pneumonia"].sum() < len(rows)  # the threshold splits them: both decisions are checked

    _an_interrupted_export_keeps_the_earlier_one_and_a_rerun_replaces_it(tiny, tmp_path / "serving", capsys,
                                                                         monkeypatch)


def _an_interrupted_export_keeps_the_earlier_one_and_a_rerun_replaces_it(tiny, output, capsys, monkeypatch):
    """Over `output`, an earlier export (the first test's, to spare an export)."""
    fingerprint = (output / "fingerprint.pb").read_bytes()
    archive_class = type(keras.export.ExportArchive())  # the backend's class: ExportArchive() returns one of those
    real_write_out = archive_class.write_out

    def interrupted(self, filepath, **kwargs):
        real_write_out(self, filepath, **kwargs)
        (filepath / "variables" / "variables.index").write_bytes(b"partial")
        raise KeyboardInterrupt  # what SIGTERM becomes

    monkeypatch.setattr(archive_class, "write_out", interrupted)
    status, out, err = _export(tiny, output, capsys)
    assert status == 130 and err == f"error: export interrupted; {output} was left as it was\n"
    assert sorted(p.name for p in output.parent.iterdir()) == ["images.npz", "serving"]
    assert (output / "fingerprint.pb").read_bytes() == fingerprint

    monkeypatch.setattr(archive_class, "write_out", real_write_out)
    (output / "stale").write_text("from the earlier export")
    assert _export(tiny, output, capsys)[0] == 0
    assert sorted(p.name for p in output.parent.iterdir()) == ["images.npz", "serving"]
    assert not (output / "stale").exists()


def test_bad_model_metrics_or_output_is_one_line_exit_1_and_writes_nothing(tiny, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    cases = {"model": ("out", {"model": tmp_path / "no-model.keras"}),
             "metrics": ("out", {"metrics": tmp_path / "no-metrics.json"}),
             "export": ("a-file", {})}  # the output's parent is a file
    for kind, (parent, paths) in cases.items():
        status, out, err = _export(tiny, tmp_path / parent / "serving", capsys, **paths)
        assert status == 1 and out == "" and err.count("\n") == 1 and err.startswith(f"error: {kind}: "), err
    assert err == f"error: export: cannot write {tmp_path / 'a-file' / 'serving'} (File exists)\n"
    # Calibrated on logits averaged over test-time views, which the graph does not compute: refused, not exported wrong.
    tta = json.loads((tiny / "metrics.json").read_text()) | {"tta": {"views": 3, "seed": 0, "translate": 0.1,
                                                                     "rotate": 0.0, "zoom": 0.0, "contrast": 0.0}}
    (tmp_path / "tta.json").write_text(json.dumps(tta))
    status, out, err = _export(tiny, tmp_path / "out" / "serving", capsys, metrics=tmp_path / "tta.json")
    assert (status, out) == (1, "") and err == (
        f"error: export: {tmp_path / 'tta.json'} was scored with test-time augmentation (3 views), which the SavedModel "
        "does not do; export a run with evaluate.tta 1 (dvc exp run -S evaluate.tta=1)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "tta.json"]


def test_an_output_that_is_not_an_export_is_left_alone(tiny, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.keras").write_text("not to be replaced")
    status, out, err = _export(tiny, tmp_path / "models", capsys)
    assert status == 1 and err == (f"error: export: {tmp_path / 'models'} exists and is not an earlier export (no "
                                   "saved_model.pb); remove it or choose another --output\n")
    assert [p.name for p in tmp_path.iterdir()] == ["models"] and (tmp_path / "models" / "model.keras").exists()


def test_export_of_the_trained_pipeline_reproduces_the_evaluate_stages_test_predictions(trained_repo):
    """The CLI with its defaults, in the trained project: its model and metrics.json, its resized test images."""
    proc = trained_repo.run(sys.executable, "-m", "pneumonia.export")
    assert proc.stdout.startswith("export: wrote models/serving"), proc.stdout
    pixels, _ = load_split(trained_repo.path / "data/resized", "test")
    served = _serve(trained_repo.path / "models/serving", pixels)

    predictions = pd.read_csv(trained_repo.path / "metrics/predictions.csv", float_precision="round_trip")
    calibrated = predictions.loc[predictions["split"] == "test", "calibrated_probability"].to_numpy()
    threshold = json.loads((trained_repo.path / "metrics/metrics.json").read_text())["test"]["threshold"]
    np.testing.assert_allclose(served["calibrated_probability"], calibrated, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(served["pneumonia"], served["calibrated_probability"] >= threshold)
    # The evaluate stage's decisions, wherever batching's last-digit differences in the logits cannot flip them.
    clear = np.abs(calibrated - threshold) > 1e-6
    np.testing.assert_array_equal(served["pneumonia"][clear], (calibrated >= threshold)[clear])
    assert trained_repo.git("status", "--porcelain").stdout == ""  # models/serving is git-ignored
