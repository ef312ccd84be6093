import csv

import keras
import numpy as np
import pytest

import synthetic
from pneumonia import errors_report, evaluate, gradcam
from pneumonia import model as model_lib
from pneumonia.data import resize_images

SIZE = 64  # conv5 is 2x2 at this size: one cell per quadrant
HALF = SIZE // 2


def _detector_model(bright_weight: float) -> keras.Model:
    """A model whose answer is known, with the layer names Grad-CAM looks for.

    Two fixed 1x1 detectors, "bright" (x) and "dark" (255 - x), averaged per quadrant
    into a 2x2 "conv5_block3_out"; the logit is bright_weight x mean brightness and
    ignores the dark channel. So the map should follow the bright blob, never the
    dark spot (which is just as strong an activation, but with zero gradient).
    """
    pixels = keras.Input((SIZE, SIZE, 1), name="pixels")
    detectors = keras.layers.Conv2D(
        2, 1, activation="relu", name="detectors",
        kernel_initializer=keras.initializers.Constant(np.array([[[[1.0, -1.0]]]])),
        bias_initializer=keras.initializers.Constant(np.array([0.0, 255.0])),
    )(pixels)
    conv = keras.layers.AveragePooling2D(HALF, name=gradcam.LAST_CONV)(detectors)
    pooled = keras.layers.GlobalAveragePooling2D(name=model_lib.POOL)(conv)
    logit = keras.layers.Dense(
        1, name=model_lib.LOGIT, kernel_initializer=keras.initializers.Constant(np.array([[bright_weight / 255], [0.0]])),
    )(pooled)
    return keras.Model(pixels, keras.layers.Activation("sigmoid", name="probability")(logit))


QUADRANTS = ((0, 0), (0, HALF), (HALF, 0), (HALF, HALF))


def _blob_images() -> np.ndarray:
    """One image per quadrant: a bright blob there, a dark spot in the opposite quadrant."""
    images = np.full((4, SIZE, SIZE, 1), 100, np.uint8)
    for n, (top, left) in enumerate(QUADRANTS):
        images[n, top + 8 : top + 24, left + 8 : left + 24] = 250
        dark_top, dark_left = QUADRANTS[3 - n]
        images[n, dark_top + 8 : dark_top + 24, dark_left + 8 : dark_left + 24] = 0
    return images


def _hottest_quadrant(heatmap: np.ndarray) -> int:
    return int(np.argmax([heatmap[t : t + HALF, l : l + HALF].sum() for t, l in QUADRANTS]))


def test_heatmap_follows_the_discriminative_blob_not_the_strongest_activation():
    maps = gradcam.heatmaps(_detector_model(bright_weight=1.0), _blob_images())
    assert maps.shape == (4, SIZE, SIZE) and maps.dtype == np.float32
    assert [_hottest_quadrant(m) for m in maps] == [0, 1, 2, 3]  # each image in the batch has its own map
    for n, m in enumerate(maps):
        assert m.max() == pytest.approx(1.0)
        assert _hottest_quadrant(1 - m) == 3 - n  # the dark spot's quadrant is the coldest


def test_no_positive_evidence_gives_an_all_zero_map():
    # With the sign flipped, brightness argues against pneumonia: ReLU leaves nothing.
    maps = gradcam.heatmaps(_detector_model(bright_weight=-1.0), _blob_images())
    assert np.all(maps == 0)


def test_resnet50_heatmaps_have_input_size_and_range():
    keras.utils.set_random_seed(0)
    net = model_lib.build(SIZE, "none", dropout=0.2)
    images = resize_images(synthetic.make_arrays()["test_images"][:3], SIZE, "bilinear")[..., None]
    maps = gradcam.heatmaps(net, images)
    assert maps.shape == (3, SIZE, SIZE)
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(m.max() == pytest.approx(1.0) or m.max() == 0 for m in maps)


def test_heat_outside_lung_fraction():
    top, bottom, left, right = gradcam.lung_box(100, 100)
    assert (top, bottom, left, right) == (10, 90, 15, 85)  # central 80% height x 70% width
    inside = np.zeros((100, 100))
    inside[40:60, 40:60] = 1
    assert gradcam.heat_outside_lung(inside) == 0.0
    assert gradcam.heat_outside_lung(1 - np.pad(np.ones((80, 70)), ((10, 10), (15, 15)))) == 1.0
    assert gradcam.heat_outside_lung(np.ones((100, 100))) == pytest.approx(1 - 0.8 * 0.7)
    assert np.isnan(gradcam.heat_outside_lung(np.zeros((100, 100))))


def test_error_report_has_gradcam_grids_and_column(tmp_path, monkeypatch):
    monkeypatch.setattr(errors_report, "SUMMARY_CAP", 5)
    arrays = synthetic.make_arrays()
    images = resize_images(arrays["test_images"], SIZE, "bilinear")[..., None]
    labels = arrays["test_labels"][:, 0]
    probs = np.clip(0.3 * labels + 0.7 * np.random.default_rng(0).random(len(labels)), 0, 1)
    predictions = tmp_path / "predictions.csv"
    evaluate.write_predictions(predictions, {"val": labels[:2], "test": labels}, {"val": probs[:2], "test": probs},
                               {"val": probs[:2], "test": probs})
    counts = errors_report.write(images, _detector_model(1.0), predictions, 0.5, 3, 0, tmp_path / "grids",
                                 tmp_path / "errors.csv")
    for name in ("false_negatives", "false_positives", "random_samples", "gradcam_summary"):
        assert (tmp_path / "grids" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with open(tmp_path / "errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "label", "probability", "error", "confidence_rank", "heat_outside_lung"]
    fn = [r for r in rows if r["error"] == "false negative"]
    fp = [r for r in rows if r["error"] == "false positive"]
    assert len(fn) == counts["fn"] > 3 and len(fp) == counts["fp"] > 8 and rows == fn + fp
    for group in (fn, fp):
        assert [int(r["confidence_rank"]) for r in group] == list(range(1, len(group) + 1))
    # The probabilities the decisions were made on, exactly: most confident first, each on the wrong side of 0.5.
    assert all(float(r["probability"]) == probs[int(r["index"])] and int(r["label"]) == labels[int(r["index"])] for r in rows)
    assert [float(r["probability"]) for r in fn] == sorted(float(r["probability"]) for r in fn)
    assert all(float(r["probability"]) < 0.5 for r in fn) and all(float(r["probability"]) >= 0.5 for r in fp)
    # A false negative has a heatmap only when shown (in its grid or among the random samples);
    # a false positive when shown or in the summary's sample.
    random_shown = set(errors_report.select(labels, probs, 0.5, 3, 0)["random_samples"].tolist())
    shown_fn = {r["index"] for r in fn[:3]} | {r["index"] for r in fn if int(r["index"]) in random_shown}
    assert {r["index"] for r in fn if r["heat_outside_lung"]} == shown_fn
    assert all(r["heat_outside_lung"] for r in fp[:3])
    assert 5 <= sum(bool(r["heat_outside_lung"]) for r in fp) <= 8
    assert all(0 <= float(r["heat_outside_lung"]) <= 1 for r in rows if r["heat_outside_lung"])


def test_a_model_without_the_last_resnet_block_is_one_clear_error():
    from pneumonia.errors import PipelineError

    inputs = keras.Input((8, 8, 1))
    other = keras.Model(inputs, keras.layers.Dense(1, name="logit")(keras.layers.Flatten()(inputs)), name="other")
    with pytest.raises(PipelineError, match="other has no conv5_block3_out or logit layer; Grad-CAM needs"):
        gradcam.split_at_last_conv(other)
