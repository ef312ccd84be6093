"""Augmentation: the K-view cache is exact, on-the-fly augmentation resumes exactly, validation is never augmented."""
import json

import keras
import numpy as np
import pytest

import synthetic
from pneumonia import augment as augment_lib
from pneumonia import model as model_lib
from pneumonia import train
from pneumonia.errors import PipelineError
from pneumonia.params import AugmentParams, ComputeParams

SIZE = 32
ON = AugmentParams(enabled=True, views=3)


def _images(n, seed=0, size=SIZE):
    from pneumonia.data import resize_images

    arrays = synthetic.make_arrays(seed)
    return (resize_images(arrays["train_images"][:n], size, "bilinear")[..., None],
            arrays["train_labels"][:n, 0].astype("int32"))


def test_views_are_fixed_by_seed_view_and_chunk_and_change_the_images():
    x, _ = _images(40)
    layers = augment_lib.layers(ON, 0)
    first = augment_lib.view(layers, x, seed=5, view_index=0, chunk=20)
    assert first.shape == x.shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, augment_lib.view(augment_lib.layers(ON, 9), x, 5, 0, 20))  # layer seed unused
    second = augment_lib.view(layers, x, 5, 1, 20)
    assert np.abs(first - x).mean() > 1 and np.abs(first - second).mean() > 1  # a real change, and views differ
    assert first.min() >= 0 and first.max() <= 255  # contrast clipped to the pixel range
    # No flips: the left half stays (mostly) where it was. A mirrored image would correlate far worse.
    mirrored = np.corrcoef(first.ravel(), x[:, :, ::-1].ravel())[0, 1]
    assert np.corrcoef(first.ravel(), x.ravel())[0, 1] > mirrored + 0.05


@pytest.mark.slow  # over 10 s: make test only
def test_test_time_views_apply_one_draw_to_every_image_as_if_each_were_transformed_alone():
    """tta_views transforms whole chunks with one drawn transformation; the reference is the definition, each
    image transformed alone from the seeds (seed, k, 0)."""
    x, _ = _images(7)
    record = {"views": 3, "seed": 7, "translate": 0.1, "rotate": 0.05, "zoom": 0.1, "contrast": 0.2}
    views = list(augment_lib.tta_views(record, x, chunk=3))  # chunks of 3, 3 and 1
    layers = augment_lib.geometric_layers(AugmentParams(**{k: record[k] for k in ("translate", "rotate", "zoom",
                                                                                 "contrast")}), 7)
    assert len(views) == 3 and views[0] is x
    for k in (1, 2):
        alone = np.concatenate([augment_lib.transform(layers, image[None], 7, k, 0) for image in x])
        np.testing.assert_allclose(views[k], alone, rtol=0, atol=1e-3)  # float32 pixels in 0..255
        assert np.abs(views[k] - x).mean() > 1  # a real change
    assert np.abs(views[1] - views[2]).mean() > 1


def test_one_epoch_on_a_cached_augmented_view_equals_plain_fit_of_the_full_model_on_that_view(tmp_path):
    """The K-view route (prefix run once on view v, the suffix trained on its activations) is the same maths as
    `fit` of the whole model, frozen prefix included, on the augmented images of view v. Without augmentation
    fine_tune takes the same route on the images themselves: this test stands for both."""
    x, y = _images(64)
    val = _images(16, seed=1)
    runtime = train.configure(0, ComputeParams())
    keras.utils.set_random_seed(1)
    project = model_lib.build(SIZE, "none", dropout=0.0)
    plain = model_lib.build(SIZE, "none", dropout=0.0)
    initial = project.get_weights()
    plain.set_weights(initial)
    kernel = project.get_layer("conv5_block3_3_conv").get_weights()[0].copy()

    keras.utils.set_random_seed(7)
    train.fine_tune(project, (x, y), val, block="conv5_block1", train_batchnorm=False, cache_dtype="float32",
                    runtime=runtime, augment=ON, lr=1e-3, epochs=1, patience=1, batch_size=16,
                    live_dir=tmp_path / "live")

    keras.utils.set_random_seed(7)
    view_seed = int(np.random.randint(2**31))  # the draws fine_tune makes: the views' seed, then the batch order's
    batches = train.Batches(augment_lib.view(augment_lib.layers(ON, 0), x, view_seed, 0, train.chunk_size(len(x))),
                            y, 16, seed=int(np.random.randint(2**31)))
    batches.on_epoch_begin()
    xs = np.concatenate([batches[i][0] for i in range(len(batches))])
    ys = np.concatenate([batches[i][1] for i in range(len(batches))])
    model_lib.set_trainable(plain, "conv5_block1", train_batchnorm=False)
    plain.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy())
    plain.fit(xs, ys, epochs=1, batch_size=16, shuffle=False, class_weight=train.class_weights(y), verbose=0)

    assert np.abs(project.get_layer("conv5_block3_3_conv").get_weights()[0] - kernel).max() > 1e-3  # it trained
    for name in ("conv5_block3_3_conv", "logit"):
        for a, b in zip(project.get_layer(name).get_weights(), plain.get_layer(name).get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # The same fit on the un-augmented images ends elsewhere: the comparison above can fail.
    other = model_lib.build(SIZE, "none", dropout=0.0)
    other.set_weights(initial)
    model_lib.set_trainable(other, "conv5_block1", train_batchnorm=False)
    other.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy())
    batches.views = [x]
    plain_x = np.concatenate([batches[i][0] for i in range(len(batches))])
    other.fit(plain_x, ys, epochs=1, batch_size=16, shuffle=False, class_weight=train.class_weights(y), verbose=0)
    assert np.abs(other.get_layer("logit").get_weights()[0] - project.get_layer("logit").get_weights()[0]).max() > 1e-4


SHIFT = AugmentParams(enabled=True, blur=1.0, gamma=0.25, brightness=0.1, noise=0.03)


def test_acquisition_shift_is_off_by_default_and_fixed_by_seed_when_on():
    x, _ = _images(24)
    assert [type(layer).__name__ for layer in augment_lib.layers(ON, 0)] == [  # earlier runs' draws are unchanged
        "RandomTranslation", "RandomRotation", "RandomZoom", "RandomContrast"]
    shifted = augment_lib.layers(SHIFT, 0)
    assert isinstance(shifted[-1], augment_lib.AcquisitionShift)
    first = augment_lib.view(shifted, x, seed=5, view_index=0, chunk=12)
    np.testing.assert_array_equal(first, augment_lib.view(augment_lib.layers(SHIFT, 0), x, 5, 0, 12))
    plain = augment_lib.view(augment_lib.layers(ON, 0), x, 5, 0, 12)
    assert first.dtype == np.float32 and first.min() >= 0 and first.max() <= 255
    assert np.abs(first - plain).mean() > 1  # the shift changes what the geometric layers made
    assert "blur sigma 1 px" in augment_lib.describe(SHIFT, frozen_prefix=False)


def test_acquisition_shift_draws_each_part_per_image():
    x = np.full((400, 16, 16, 1), 128.0, "float32")
    shift = augment_lib.AcquisitionShift(AugmentParams(brightness=0.1))
    out = shift.transform_images(x, shift.get_random_transformation(x, seed=1))
    means = out.mean(axis=(1, 2, 3)) - 128
    assert np.abs(means).max() <= 25.5 + 1e-3 and means.std() > 10  # up to 10% of 255, different per image
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 0, atol=1e-3)  # no noise, blur or gamma asked for

    shift = augment_lib.AcquisitionShift(AugmentParams(noise=0.03))
    noise = shift.transform_images(x, shift.get_random_transformation(x, seed=1)).std(axis=(1, 2, 3))
    assert noise.max() <= 0.03 * 255 * 1.3 and noise.min() < 1 < 5 < noise.max()

    shift = augment_lib.AcquisitionShift(AugmentParams(gamma=0.25))
    ramp = np.broadcast_to(np.linspace(0, 255, 16, dtype="float32")[None, None, :, None], (400, 16, 16, 1))
    t = shift.get_random_transformation(ramp, seed=1)
    assert t["gamma"].min() >= 1 / 1.25 - 1e-6 and t["gamma"].max() <= 1.25 + 1e-6
    out = shift.transform_images(ramp, t)
    np.testing.assert_allclose(out[:, :, [0, -1]], ramp[:, :, [0, -1]], atol=1e-3)  # black and white stay
    np.testing.assert_allclose(out[:, 0, 8, 0], 255 * (ramp[0, 0, 8, 0] / 255) ** t["gamma"], rtol=1e-5)


def test_the_blur_is_a_gaussian_of_each_images_own_sigma():
    x = (np.random.default_rng(0).random((3, 20, 20, 1)) * 255).astype("float32")
    blurred = augment_lib._blur(x, np.array([0.0, 0.7, 1.0]))
    np.testing.assert_array_equal(blurred[0], x[0])  # sigma 0: untouched
    for i, sigma in ((1, 0.7), (2, 1.0)):
        reference = keras.ops.convert_to_numpy(keras.ops.image.gaussian_blur(
            x[i : i + 1], kernel_size=(5, 5), sigma=(sigma, sigma)))[0]
        np.testing.assert_allclose(blurred[i][2:-2, 2:-2], reference[2:-2, 2:-2], atol=1e-3)  # edges differ: reflect
    assert blurred[2].std() < blurred[1].std() < x[1].std()


def test_epoch_e_reads_view_e_mod_k():
    views = [np.full((10, 1), v, "float32") for v in range(3)]
    batches = train.Batches(views, np.zeros(10, "int32"), 4, seed=0)
    seen = []
    for _ in range(5):
        batches.on_epoch_begin()
        seen.append({float(v) for i in range(len(batches)) for v in batches[i][0][:, 0]})
    assert seen == [{0.0}, {1.0}, {2.0}, {0.0}, {1.0}]


def test_memory_check_counts_every_view(monkeypatch):
    import psutil

    class Memory:
        available = 100 * 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    train.check_resources(1000, (10, 10, 10), "float32", "fine_tune", views=1)  # 4 MB: fits
    with pytest.raises(PipelineError, match="fewer augment.views"):
        train.check_resources(1000 * 30, (10, 10, 10), "float32", "fine_tune", views=30)  # 120 MB: does not


def _small_net():
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def _fit_small(tmp_path, name, augment, stop_after=None, keep="last"):
    from test_train import StopAfterEpoch

    x, y = _images(48, size=16)
    val = _images(24, seed=1, size=16)
    keras.backend.clear_session()  # layer names (and so variable paths) restart as in a new process
    keras.utils.set_random_seed(0)
    runtime = train.configure(0, ComputeParams())
    net = _small_net()
    original_fit = keras.Model.fit
    extra = [StopAfterEpoch(stop_after)] if stop_after else []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.Model, "fit", lambda self, *a, **kw: original_fit(
            self, *a, **{**kw, "callbacks": [*kw["callbacks"], *extra]}))
        train.fit(net, (x, y), val, lr=0.05, epochs=5, patience=5, batch_size=16, runtime=runtime,
                  live_dir=tmp_path / name, backup_dir=tmp_path / "resume" / name, keep=keep, augment=augment)
    return net, val


@pytest.mark.slow  # over 10 s: make test only
def test_on_the_fly_augmentation_resumes_exactly_and_never_touches_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_CHECKPOINT_EVERY_S", "0")
    net, val = _fit_small(tmp_path, "uninterrupted", ON)
    assert [layer.name for layer in net.layers if layer.name.startswith("augment")] == []  # the saved model is bare
    logged = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
    net.compile(loss=keras.losses.BinaryCrossentropy())
    # keep=last: the logged validation loss is the final model's on the plain validation images.
    evaluated = net.evaluate(*val, batch_size=16, verbose=0, return_dict=True)["loss"]
    assert logged["eval"]["loss"] == pytest.approx(evaluated, rel=1e-5)

    with pytest.raises(KeyboardInterrupt):
        _fit_small(tmp_path, "killed", ON, stop_after=3)
    resumed, _ = _fit_small(tmp_path, "killed", ON)  # augmentation seeds are fixed by (seed, epoch, batch)
    for a, b in zip(resumed.get_weights(), net.get_weights()):
        np.testing.assert_array_equal(a, b)

    plain, _ = _fit_small(tmp_path, "plain", None)
    assert not all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), net.get_weights()))


def test_mixup_mixes_each_image_with_one_other_and_carries_the_class_weights():
    """Each row is λ·x_i + (1 - λ)·x_j for one j and one λ in [0, 1], and its label and weight are the ones
    that make W·BCE(p, ỹ) the pair's class-weighted loss: W = λ·w_i + (1 - λ)·w_j, W·ỹ = λ·w_i·y_i + (1 - λ)·w_j·y_j."""
    n = 16
    index = np.arange(n, dtype="float32")
    x = np.stack([index, index**2], axis=1).reshape(n, 1, 2)  # j recovered from two features, any rank mixed
    y = (np.arange(n) % 3 == 0).astype("int32")
    weights = {0: 0.7, 1: 1.9}
    mixed, soft, w = augment_lib.mixup(x, y, weights, alpha=0.4, seed=3, epoch=2, batch=5)
    assert mixed.shape == x.shape and mixed.dtype == x.dtype and soft.shape == w.shape == (n,)
    wy = np.where(y == 1, weights[1], weights[0])
    partners = 0
    for i in range(n):
        found = []
        for j in range(n):
            lam = 1.0 if i == j else (mixed[i, 0, 0] - j) / (i - j)
            if -1e-4 <= lam <= 1 + 1e-4 and abs(lam * i**2 + (1 - lam) * j**2 - mixed[i, 0, 1]) < 1e-2 * max(1, i, j) ** 2:
                found.append((j, lam))
        j, lam = min(found, key=lambda f: abs(f[1] * i**2 + (1 - f[1]) * f[0] ** 2 - mixed[i, 0, 1]))
        partners += j != i and 0.01 < lam < 0.99
        assert w[i] == pytest.approx(lam * wy[i] + (1 - lam) * wy[j], abs=1e-3)
        assert w[i] * soft[i] == pytest.approx(lam * wy[i] * y[i] + (1 - lam) * wy[j] * y[j], abs=1e-3)
    assert partners >= 4  # really mixed, not only near-copies
    again = augment_lib.mixup(x, y, weights, alpha=0.4, seed=3, epoch=2, batch=5)
    np.testing.assert_array_equal(again[0], mixed)  # fixed by (seed, epoch, batch), so a resumed run draws the same
    assert not np.array_equal(augment_lib.mixup(x, y, weights, alpha=0.4, seed=3, epoch=3, batch=5)[0], mixed)
