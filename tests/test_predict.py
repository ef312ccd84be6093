import csv
import io
import json
import sys

import keras
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEGLSLossless
from scipy.special import expit

import dicom_files
import synthetic
from conftest import ROOT
from pneumonia import model as model_lib
from pneumonia import files, predict, train
from pneumonia.data import resize_images

SIZE = 32
TEMPERATURE = 2.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny saved model and a metrics.json with a non-trivial temperature."""
    root = tmp_path_factory.mktemp("trained")
    keras.utils.set_random_seed(0)
    train.save(model_lib.build(SIZE, "none", dropout=0.2), root / "model.keras")
    (root / "metrics.json").write_text(json.dumps({"test": {"threshold": 0.5}, "calibration": {"temperature": TEMPERATURE}}))
    return root


@pytest.fixture(scope="module")
def test_images():
    return synthetic.make_arrays()["test_images"][:6]


def _run(trained, capsys, *args):
    """predict.main with the tiny model; returns (exit status, CSV rows, stderr lines)."""
    status = predict.main([*map(str, args), "--model", str(trained / "model.keras"), "--metrics",
                           str(trained / "metrics.json"), "--params", str(ROOT / "params.yaml")])
    out, err = capsys.readouterr()
    return status, list(csv.DictReader(io.StringIO(out))), err.splitlines()


def _png(path, image):
    Image.fromarray(image).save(path)
    return path


def test_png_from_the_npz_gives_the_pipelines_array_and_probability(trained, test_images, tmp_path, capsys):
    pngs = [_png(tmp_path / f"test{i}.png", test_images[i]) for i in (0, 5)]
    pipeline = resize_images(test_images, SIZE, "bilinear")[..., None]  # the resize stage; params.yaml says bilinear
    for png, i in zip(pngs, (0, 5)):
        source = predict.to_source_resolution(predict.read_gray(png), 28)
        np.testing.assert_array_equal(predict.preprocess(source[None], SIZE, "bilinear")[0], pipeline[i])

    npz = tmp_path / "images.npz"
    np.savez(npz, test_images=test_images, test_labels=np.zeros((6, 1), np.uint8))
    status, rows, err = _run(trained, capsys, *pngs, npz)
    assert status == 0 and err == []
    by_file = {r["file"]: r for r in rows}
    assert len(rows) == 2 + 6
    # The evaluate stage's calibrated probability: sigmoid(logit / T) on the pipeline's array.
    logits = model_lib.logits_model(model_lib.load(trained / "model.keras")).predict(pipeline, verbose=0).reshape(-1)
    for png, i in zip(pngs, (0, 5)):
        from_png, from_npz = by_file[str(png)], by_file[f"{npz}[test/{i}]"]
        assert from_png["probability"] == from_npz["probability"]
        assert float(from_png["probability"]) == pytest.approx(expit(logits[i] / TEMPERATURE), abs=2e-6)
        assert from_png["decision"] == ("pneumonia" if float(from_png["probability"]) >= 0.5 else "normal")
        assert from_png["threshold"] == "0.5" and from_png["error"] == ""


def test_platt_calibration_from_metrics_json_is_applied(trained, test_images, tmp_path, capsys):
    """predict applies the run's calibration, whichever it is: here Platt's scale and offset."""
    metrics_json = tmp_path / "metrics.json"
    metrics_json.write_text(json.dumps({"test": {"threshold": 0.5}, "calibration": {
        "method": "platt", "scale": 0.7, "offset": -0.4, "temperature": None}}))
    png = _png(tmp_path / "test0.png", test_images[0])
    status = predict.main([str(png), "--model", str(trained / "model.keras"), "--metrics", str(metrics_json),
                           "--params", str(ROOT / "params.yaml")])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    pipeline = resize_images(test_images[:1], SIZE, "bilinear")[..., None]
    logit = model_lib.logits_model(model_lib.load(trained / "model.keras")).predict(pipeline, verbose=0).reshape(-1)[0]
    assert status == 0 and float(rows[0]["probability"]) == pytest.approx(expit(0.7 * logit - 0.4), abs=2e-6)


def test_large_non_square_image_is_center_cropped_to_28(tmp_path):
    image = np.full((300, 400, 3), 255, np.uint8)  # white side bands, 50 px each
    image[:, 50:350] = 100
    gray = predict.read_gray(_png(tmp_path / "wide.png", image))
    source = predict.to_source_resolution(gray, 28)
    assert source.shape == (28, 28) and np.all(source == 100)


def test_a_native_resolution_model_gets_images_at_its_data_size_from_its_record(tmp_path, capsys):
    """A model trained on MedMNIST+'s 64 px file at image_size 64: new images go down to 64 px, not 28, and are not
    resized again (the resize stage kept them), whatever params.yaml says; the record beside the model decides."""
    keras.utils.set_random_seed(0)
    train.save(model_lib.build(64, "none", dropout=0.0), tmp_path / "model.keras")
    (tmp_path / "model.json").write_text(json.dumps({"resize": {"data.size": 64, "image_size": 64,
                                                                "resize.interpolation": "nearest"}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"threshold": 0.5}, "calibration": {"temperature": 1.0}}))
    rng = np.random.default_rng(0)
    xray = rng.integers(0, 255, (300, 400), dtype=np.uint8)
    png = _png(tmp_path / "xray.png", xray)
    assert predict.read_preprocessing(tmp_path / "model.keras", ROOT / "params.yaml") == (64, "nearest")
    expected = np.asarray(Image.fromarray(xray[:, 50:350]).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(predict.to_source_resolution(predict.read_gray(png), 64), expected)
    np.testing.assert_array_equal(predict.preprocess(expected[None], 64, "nearest")[0, ..., 0], expected)

    status = predict.main([str(png), "--model", str(tmp_path / "model.keras"), "--metrics", str(tmp_path / "metrics.json"),
                           "--params", str(ROOT / "params.yaml")])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    net = model_lib.load(tmp_path / "model.keras")
    assert status == 0 and float(rows[0]["probability"]) == pytest.approx(
        float(net.predict(expected[None, ..., None], verbose=0)[0, 0]), abs=2e-6)

    (tmp_path / "model.json").write_text("{not json")
    assert predict.main([str(png), "--model", str(tmp_path / "model.keras"), "--metrics",
                         str(tmp_path / "metrics.json")]) == 1
    assert "model.json is not the record the fine_tune stage writes" in capsys.readouterr().err


def test_jpeg_with_exif_orientation_comes_out_upright(tmp_path):
    """Orientation 6: stored turned 90 degrees anticlockwise, displayed by turning it clockwise."""
    upright = np.zeros((64, 32), np.uint8)
    upright[:16] = 255  # bright top band
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(np.rot90(upright)).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    gray = predict.read_gray(tmp_path / "phone.jpg")
    assert gray.shape == (64, 32) and np.abs(gray.astype(int) - upright).mean() < 2


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 4000, 28 * 28).reshape(28, 28).astype(np.uint16)
    gray = predict.read_gray(_png(tmp_path / "deep.png", ramp))
    assert gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255 and len(np.unique(gray)) > 200


def _bad_file(directory, case):
    path = directory / case.replace(" ", "_")
    if case == "not an image":
        path.write_text("this is a text file\n")
    elif case == "truncated PNG":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(path, format="png")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "zero bytes":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "DICOM without pydicom":
        path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    elif case.startswith("npz"):
        path = path.with_suffix(".npz")
        np.savez(path, test_images=np.zeros((0, 28, 28), np.uint8) if case == "npz without images" else np.uint8(0))
    return path  # "missing": never created


BAD_CASES = {
    "not an image": "not a readable image",
    "truncated PNG": "truncated",
    "zero bytes": "empty (0 bytes)",
    "directory": "is a directory",
    "missing": "no such file",
    "DICOM without pydicom": "needs pydicom",
    "npz without images": "test_images is uint8 (0, 28, 28); expected (N, H, W) uint8 grayscale, N, H and W at least 1",
    "npz 0-d images": "test_images is uint8 (); expected (N, H, W)",
}


def test_each_bad_file_gets_one_error_line_and_row_and_the_others_are_predicted(trained, test_images, tmp_path,
                                                                                capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as where pydicom is not installed
    good = [_png(tmp_path / f"good{i}.png", test_images[i]) for i in (0, 1)]
    bad = {case: _bad_file(tmp_path, case) for case in BAD_CASES}
    status, rows, err = _run(trained, capsys, good[0], *bad.values(), good[1])  # one model load for all cases
    assert status == 1
    assert [r["file"] for r in rows] == list(map(str, [good[0], *bad.values(), good[1]]))
    for row in (rows[0], rows[-1]):
        assert row["probability"] and row["decision"] and row["error"] == ""
    assert len(err) == len(BAD_CASES)
    for (case, path), line, row in zip(bad.items(), err, rows[1:-1]):
        assert line.startswith(f"error: {path}: ") and BAD_CASES[case] in line, (case, line)
        assert row["probability"] == row["decision"] == "" and BAD_CASES[case] in row["error"], (case, row)


def test_undecodable_compressed_dicom_is_one_error_row_and_a_good_dicom_is_still_predicted(trained, test_images,
                                                                                           tmp_path, capsys):
    good = dicom_files.write(tmp_path / "good.dcm", 1000 + 10 * test_images[0].astype(np.uint16), bits_stored=12)
    compressed = dicom_files.write(tmp_path / "compressed.dcm", test_images[0], syntax=JPEGLSLossless)
    same = _png(tmp_path / "same.png", predict.read_gray(good))  # what the DICOM reads as
    status, rows, err = _run(trained, capsys, good, compressed, same)
    assert status == 1 and [r["file"] for r in rows] == list(map(str, [good, compressed, same]))
    assert rows[0]["probability"] == rows[2]["probability"] != "" and rows[0]["error"] == rows[2]["error"] == ""
    assert rows[1]["probability"] == "" and rows[1]["error"].startswith("compressed transfer syntax JPEG-LS")
    assert err == [f"error: {compressed}: {rows[1]['error']}"]


@pytest.mark.parametrize("missing", ["model", "metrics"])
def test_missing_model_or_metrics_is_one_line_and_exit_1(missing, trained, test_images, tmp_path, capsys):
    paths = {"model": trained / "model.keras", "metrics": trained / "metrics.json", missing: tmp_path / f"no-{missing}"}
    status = predict.main([str(_png(tmp_path / "good.png", test_images[0])), "--model", str(paths["model"]),
                           "--metrics", str(paths["metrics"]), "--interpolation", "bilinear"])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {missing}: ") and f"no-{missing}" in err


def test_model_without_logit_layer_is_one_line_and_exit_1(trained, test_images, tmp_path, capsys):
    inputs = keras.Input((SIZE, SIZE, 1))
    other = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="score")(keras.layers.Flatten()(inputs)))
    other.save(tmp_path / "other.keras")
    status = predict.main([str(_png(tmp_path / "good.png", test_images[0])), "--model", str(tmp_path / "other.keras"),
                           "--metrics", str(trained / "metrics.json"), "--interpolation", "bilinear",
                           "--output", str(tmp_path / "out.csv")])
    out, err = capsys.readouterr()
    assert status == 1 and out == "" and not (tmp_path / "out.csv").exists()
    assert err == (f"error: model: {tmp_path / 'other.keras'} has no 'logit' layer; it is not a model trained by this "
                   "pipeline, retrain with dvc repro\n")


def test_json_output_file_and_gradcam_overlays(trained, test_images, tmp_path, capsys):
    good = _png(tmp_path / "good.png", test_images[1])
    out = tmp_path / "out.json"
    status = predict.main([str(good), str(tmp_path / "missing.png"), "--json", "--output", str(out), "--gradcam",
                           str(tmp_path / "cams"), "--model", str(trained / "model.keras"),
                           "--metrics", str(trained / "metrics.json"), "--interpolation", "bilinear"])
    assert status == 1 and capsys.readouterr().out == ""
    rows = json.loads(out.read_text())
    assert [set(r) for r in rows] == [set(predict.FIELDS)] * 2
    assert 0 < rows[0]["probability"] < 1 and rows[0]["error"] is None
    assert rows[1]["probability"] is None and rows[1]["error"] == "no such file"
    assert [p.name for p in (tmp_path / "cams").iterdir()] == ["0001_good.png"]
    assert (tmp_path / "cams" / "0001_good.png").read_bytes()[:8] == PNG_MAGIC


TTA = {"views": 3, "seed": 7, "translate": 0.1, "rotate": 0.05, "zoom": 0.1, "contrast": 0.2}


@pytest.mark.slow  # over 10 s: make test only
def test_test_time_augmentation_is_the_mean_logit_over_fixed_views(trained, test_images):
    from pneumonia import augment, evaluate
    from pneumonia.params import AugmentParams

    net = model_lib.load(trained / "model.keras")
    pixels = resize_images(test_images, SIZE, "bilinear")[..., None]
    plain = model_lib.logits_model(net).predict(pixels, batch_size=32, verbose=0).reshape(-1).astype("float64")
    # One view (the default) is the logits as evaluate computed them before TTA, exactly.
    assert evaluate.logits(net, pixels, 32, "test").tolist() == plain.tolist()
    assert evaluate.logits(net, pixels, 32, "test", {"views": 1}).tolist() == plain.tolist()

    # Three: the image, and views 1 and 2 of each image transformed alone from seeds (7, k, 0), by hand.
    layers = augment.layers(AugmentParams(translate=0.1, rotate=0.05, zoom=0.1, contrast=0.2), 7)
    views = [pixels] + [np.concatenate([augment.transform(layers, image[None], 7, k, 0) for image in pixels])
                        for k in (1, 2)]
    assert not np.allclose(views[1], pixels) and not np.allclose(views[1], views[2])
    by_hand = [model_lib.logits_model(net).predict(v, batch_size=32, verbose=0).reshape(-1).astype("float64")
               for v in views]
    tta = evaluate.logits(net, pixels, 32, "test", TTA)
    np.testing.assert_allclose(tta, np.mean(by_hand, axis=0), rtol=0, atol=1e-12)
    assert np.abs(tta - plain).max() > 1e-4  # the views move the logits


@pytest.mark.slow  # over 10 s: make test only
def test_predict_scores_an_image_on_the_views_the_evaluate_stage_recorded(trained, tmp_path, capsys):
    from pneumonia import evaluate
    from pneumonia import params as params_lib

    arrays = synthetic.make_arrays()
    val = resize_images(arrays["val_images"][:60], SIZE, "bilinear")[..., None], arrays["val_labels"][:60, 0]
    test = resize_images(arrays["test_images"][:6], SIZE, "bilinear")[..., None], arrays["test_labels"][:6, 0]
    params = params_lib.for_stage(params_lib.from_dict({
        "seed": TTA["seed"], "augment": {k: TTA[k] for k in files.TTA_RANGES},
        "evaluate": {"tta": 3, "bootstrap": {"samples": 0}}}), "evaluate")
    net = model_lib.load(trained / "model.keras")
    record = evaluate.tta_record(params)
    assert record == TTA
    evaluate.evaluate(val, test, evaluate.logits(net, val[0], 32, "val", record),
                      evaluate.logits(net, test[0], 32, "test", record), params, tmp_path / "metrics.json",
                      tmp_path / "predictions.csv", tmp_path / "plots")
    assert json.loads((tmp_path / "metrics.json").read_text())["tta"] == TTA
    _, evaluated = evaluate.read_predictions(tmp_path / "predictions.csv", "test")

    pngs = [_png(tmp_path / f"test{i}.png", arrays["test_images"][i]) for i in (0, 5)]
    args = [*map(str, pngs), "--model", str(trained / "model.keras"), "--params", str(ROOT / "params.yaml")]
    assert predict.main([*args, "--metrics", str(tmp_path / "metrics.json")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    np.testing.assert_allclose([float(r["probability"]) for r in rows], evaluated[[0, 5]], rtol=0, atol=2e-6)

    # Without the record, predict scores the image alone: another probability, so the record is what matched.
    without = json.loads((tmp_path / "metrics.json").read_text())
    del without["tta"]
    (tmp_path / "plain.json").write_text(json.dumps(without))
    assert predict.main([*args, "--metrics", str(tmp_path / "plain.json")]) == 0
    plain = [float(r["probability"]) for r in csv.DictReader(io.StringIO(capsys.readouterr().out))]
    assert np.abs(np.array(plain) - evaluated[[0, 5]]).max() > 1e-4

    (tmp_path / "bad.json").write_text(json.dumps(without | {"tta": {"views": 3}}))
    assert predict.main([*args, "--metrics", str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().err == (
        f"error: metrics: {tmp_path / 'bad.json'}: tta is {{'views': 3}}, not the views, seed and translate, rotate, "
        "zoom, contrast the evaluate stage records; rerun dvc repro evaluate to rewrite it\n")
