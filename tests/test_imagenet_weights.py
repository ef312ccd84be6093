"""model.weights=imagenet, the users' setting, through Keras's own download, hash check and legacy h5 loading.

ImageNet weights cannot be fetched here, so a module fixture writes a ResNet-50 no-top weights file of seeded
random values in the legacy h5 layout the real file has, and only the network fetch inside Keras's get_file is
replaced, by a copy of that file. Everything else is Keras's and the project's own code: the URL Keras asks for,
its cache folder, its MD5 check, its topological (order-based) h5 loading into `model.build`'s network with our
two layers in front, and then both training phases from those weights.
"""
import hashlib
import shutil
import urllib.error

import h5py
import keras
import numpy as np
import pytest
from keras.src.applications import resnet as keras_resnet
from keras.src.backend import config as keras_config
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils

import synthetic
from pneumonia import model as model_lib
from pneumonia import train
from pneumonia.data import resize_images
from pneumonia.errors import PipelineError
from pneumonia.params import ComputeParams, FineTuneParams, unfreeze_block

FILE_NAME = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
OFFICIAL_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + FILE_NAME
SIZE, N_TRAIN, N_VAL, BATCH = 32, 32, 16, 16
BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def _random_value(name: str, shape, rng) -> np.ndarray:
    """Seeded values of a plausible scale, so 50 layers in inference mode keep the activations finite."""
    if name == "kernel":
        return rng.normal(0, np.sqrt(1 / np.prod(shape[:-1])), shape)
    if name == "gamma":
        return rng.uniform(0.2, 0.6, shape)
    if name == "moving_variance":
        return rng.uniform(0.5, 1.5, shape)  # positive: BatchNorm divides by its square root
    return rng.normal(0, 0.1, shape)  # bias, beta, moving_mean


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A ResNet-50 no-top weights file (about 94 MB) of seeded random values, written by Keras's legacy h5 writer.

    The layout Keras's loader reads, as in the real file: the layer names as an attribute, a group per layer with
    its weight names in order. Keras 3's writer differs only in what the loader ignores or tolerates: weight
    names without ":0" and an empty top_level_model_weights group.
    """
    keras.backend.clear_session()
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    rng = np.random.default_rng(2024)
    for variable in source.weights:
        variable.assign(_random_value(variable.name, tuple(variable.shape), rng).astype("float32"))
    path = tmp_path_factory.mktemp("imagenet") / FILE_NAME
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    keras.backend.clear_session()
    return path


def _images(n, seed=0):
    arrays = synthetic.make_arrays(seed)
    return (resize_images(arrays["train_images"][:n], SIZE, "bilinear")[..., None],
            arrays["train_labels"][:n, 0].astype("int32"))


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def file_values(path) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {weight: array}} for the layers with weights, in the file's layer order, read with h5py alone.

    Weight names are the last part of each dataset's name without Keras 2's ":0" (conv1_conv/kernel:0 in the
    real file, conv1_conv/kernel as Keras 3 writes it).
    """
    values = {}
    with h5py.File(path, "r") as f:
        for layer in f.attrs["layer_names"]:
            layer = layer.decode() if isinstance(layer, bytes) else str(layer)
            group = f[layer]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]
            if names:
                values[layer] = {n.split("/")[-1].split(":")[0]: group[n][()] for n in names}
    return values


def model_values(layer) -> dict[str, np.ndarray]:
    return {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}


def assert_layer_equals_file(net, name, expected):
    got = model_values(net.get_layer(name))
    assert got.keys() == expected.keys(), name
    for weight, value in expected.items():
        np.testing.assert_array_equal(got[weight], value, err_msg=f"{name}/{weight}")


@pytest.fixture
def keras_home(monkeypatch, tmp_path):
    """Keras's cache (normally ~/.keras) in a fresh temporary folder.

    KERAS_HOME is read once, when Keras is imported, and get_file asks config.keras_home() for it on every call,
    so the variable that function returns is set; the folder exists, or get_file would fall back to /tmp/.keras.
    """
    home = tmp_path / "keras-home"
    home.mkdir()
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))
    return home


def fake_network(monkeypatch, serve=None, fail=None) -> list:
    """Replace the one call in get_file that touches the network (urllib's urlretrieve, imported into
    file_utils); it copies `serve` to the download target or raises `fail`. Returns the calls (url, target)."""
    calls = []

    def urlretrieve(url, filename, reporthook=None, data=None):
        calls.append((url, filename))
        if fail is not None:
            raise fail
        shutil.copyfile(serve, filename)
        size, block = serve.stat().st_size, 8192
        if reporthook is not None:  # as urllib reports: before the first block, and (here) once at the end
            reporthook(0, block, size)
            reporthook(-(-size // block), block, size)
        return filename, None

    monkeypatch.setattr(file_utils, "urlretrieve", urlretrieve)
    return calls


def accept_file_hash(monkeypatch, path) -> None:
    # The official MD5 of the no-top file (WEIGHTS_HASHES["resnet50"][1]) is that of the real ImageNet weights,
    # which a file of random values cannot match, so that entry is set to the served file's MD5. get_file still
    # runs its check on the downloaded copy against this entry (test_the_official_hash_refuses_... shows it does).
    top, _ = keras_resnet.WEIGHTS_HASHES["resnet50"]
    monkeypatch.setitem(keras_resnet.WEIGHTS_HASHES, "resnet50", (top, _md5(path)))


def test_build_downloads_the_notop_file_through_keras_and_loads_it_layer_by_layer(weights_file, keras_home,
                                                                                    monkeypatch):
    accept_file_hash(monkeypatch, weights_file)
    calls = fake_network(monkeypatch, serve=weights_file)
    keras.backend.clear_session()
    train.configure(0, ComputeParams())
    net = model_lib.build(SIZE, "imagenet", 0.2)

    cached = keras_home / "models" / FILE_NAME
    assert calls == [(OFFICIAL_URL, str(cached))]  # the official URL, into Keras's cache
    assert _md5(cached) == _md5(weights_file)
    expected = file_values(weights_file)

    # Named layers, value for value from the file: a convolution (kernel, bias), BatchNorm's four, the last conv.
    assert set(expected["conv1_conv"]) == {"kernel", "bias"}
    assert set(expected["conv2_block1_1_bn"]) == set(BN_WEIGHTS)
    for name in ("conv1_conv", "conv2_block1_1_bn", "conv5_block3_3_conv"):
        assert_layer_equals_file(net, name, expected[name])

    # Loading is by order: the layers with weights must line up one for one with the file's. Our two layers in
    # front hold no weights (the preprocessing constants are not variables), so every layer gets its own values.
    assert model_values(net.get_layer("gray_to_rgb")) == {} and model_values(net.get_layer("resnet50_preprocess")) == {}
    with_weights = [layer.name for layer in net.layers if layer.weights]
    assert with_weights == [*expected, "logit"]
    for name, values in expected.items():
        assert_layer_equals_file(net, name, values)
    # ... and they still compute what they should in front of conv1: x3 - ImageNet BGR means, padded, convolved.
    x = _images(4)[0]
    conv1 = keras.Model(net.input, net.get_layer("conv1_conv").output)
    rgb = np.concatenate([x, x, x], axis=-1).astype("float32") - np.array(model_lib.IMAGENET_BGR_MEAN, "float32")
    padded = np.pad(rgb, ((0, 0), (3, 3), (3, 3), (0, 0)))
    want = keras.ops.conv(padded, expected["conv1_conv"]["kernel"], strides=2) + expected["conv1_conv"]["bias"]
    np.testing.assert_allclose(conv1.predict(x, verbose=0), keras.ops.convert_to_numpy(want), rtol=1e-4, atol=1e-3)


def test_a_file_put_in_the_keras_cache_as_the_error_advises_is_used_without_a_download(weights_file, keras_home,
                                                                                        monkeypatch):
    accept_file_hash(monkeypatch, weights_file)
    (keras_home / "models").mkdir()
    shutil.copyfile(weights_file, keras_home / "models" / FILE_NAME)
    calls = fake_network(monkeypatch, fail=urllib.error.URLError("no network in this test"))
    keras.backend.clear_session()
    net = model_lib.build(SIZE, "imagenet", 0.2)
    assert calls == []
    assert_layer_equals_file(net, "conv4_block6_3_conv", file_values(weights_file)["conv4_block6_3_conv"])


@pytest.mark.slow  # over 10 s: make test only
def test_both_phases_from_imagenet_weights_train_conv5_and_the_head_and_keep_the_rest_as_loaded(
        weights_file, keras_home, monkeypatch, tmp_path):
    accept_file_hash(monkeypatch, weights_file)
    fake_network(monkeypatch, serve=weights_file)
    keras.backend.clear_session()
    runtime = train.configure(0, ComputeParams())
    net = model_lib.build(SIZE, "imagenet", 0.2)
    expected = file_values(weights_file)
    x, y = _images(N_TRAIN + N_VAL)
    train_split, val_split = (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])

    caches = []  # (the prefix's output layer, the cache) of each run of the frozen prefix
    real_cache = train.cache_activations

    def cache_activations(prefix, images, dtype, label, view=None):
        out = real_cache(prefix, images, dtype, label, view)
        caches.append((prefix.layers[-1].name if prefix is not None else None, out))
        return out

    monkeypatch.setattr(train, "cache_activations", cache_activations)
    fit = dict(epochs=1, patience=1, batch_size=BATCH, runtime=runtime, keep="last")

    logit = model_values(net.get_layer("logit"))
    phase1 = train.train_head(net, train_split, val_split, lr=1e-3, live_dir=tmp_path / "head", **fit)
    after_head = model_values(net.get_layer("logit"))
    assert all(np.abs(after_head[w] - logit[w]).max() > 1e-5 for w in logit)  # the head trained
    for name, values in expected.items():  # the whole backbone frozen: still the file's values
        assert_layer_equals_file(net, name, values)

    block = unfreeze_block("auto", "imagenet")
    assert block == "conv5_block1"
    cache_dtype = ComputeParams().cache_dtype
    phase2 = train.fine_tune(net, train_split, val_split, block=block, train_batchnorm=False,
                             cache_dtype=cache_dtype, lr=FineTuneParams().lr, live_dir=tmp_path / "fine", **fit)

    # Each phase ran its frozen prefix once over train+val, into finite activations: phase 1 up to the pooled
    # features, phase 2 up to the input of conv5_block1 (conv4's output, 2x2 at 32 px).
    assert [name for name, _ in caches] == [model_lib.POOL, "conv4_block6_out"]
    assert caches[0][1].shape == (N_TRAIN + N_VAL, 2048)
    assert caches[1][1].shape == (N_TRAIN + N_VAL, 2, 2, 1024) and caches[1][1].dtype == cache_dtype
    assert all(np.isfinite(cache).all() for _, cache in caches)
    assert all(np.isfinite(phase["best_val_auc"]) for phase in (phase1, phase2))

    first = next(i for i, layer in enumerate(net.layers) if layer.name.startswith(block + "_"))
    conv5 = [layer for layer in net.layers[first:] if isinstance(layer, keras.layers.Conv2D)]
    assert len(conv5) == 10  # three blocks of three convolutions, and the first block's shortcut
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # frozen, its ImageNet statistics untouched
            assert not layer.trainable, layer.name
            assert_layer_equals_file(net, layer.name, expected[layer.name])
    for layer in net.layers[:first]:  # conv1 to conv4_block6: frozen with the file's values
        assert not layer.trainable, layer.name
        if layer.weights:
            assert_layer_equals_file(net, layer.name, expected[layer.name])
    for name in ("conv1_conv", "conv4_block6_3_conv"):
        assert name in expected and net.layers.index(net.get_layer(name)) < first
    for layer in conv5:  # every conv5 convolution trained away from the file's values
        assert layer.trainable, layer.name
        got = model_values(layer)
        assert np.abs(got["kernel"] - expected[layer.name]["kernel"]).max() > 1e-7, layer.name
    final = model_values(net.get_layer("logit"))
    assert all(np.abs(final[w] - after_head[w]).max() > 1e-7 for w in final)  # the head trained on in phase 2


def test_the_official_hash_refuses_a_file_that_is_not_the_real_weights(weights_file, keras_home, monkeypatch):
    calls = fake_network(monkeypatch, serve=weights_file)  # WEIGHTS_HASHES as Keras ships it
    keras.backend.clear_session()
    with pytest.raises(PipelineError) as error:
        model_lib.build(SIZE, "imagenet", 0.2)
    assert len(calls) == 1
    assert "Incomplete or corrupted file detected" in str(error.value)
    assert keras_resnet.WEIGHTS_HASHES["resnet50"][1] in str(error.value)


def test_a_failed_download_is_one_line_naming_the_fix(keras_home, monkeypatch):
    calls = fake_network(monkeypatch, fail=urllib.error.URLError("[Errno -3] Temporary failure in name resolution"))
    keras.backend.clear_session()
    with pytest.raises(PipelineError) as error:
        model_lib.build(SIZE, "imagenet", 0.2)
    message = str(error.value)
    assert calls == [(OFFICIAL_URL, str(keras_home / "models" / FILE_NAME))]
    assert "\n" not in message
    assert message.startswith(f"model: could not load ResNet-50 imagenet weights (URL fetch failure on {OFFICIAL_URL}")
    assert "Temporary failure in name resolution" in message
    assert message.endswith(f"put {FILE_NAME} in ~/.keras/models/ or set model.weights=none to train from scratch")
    assert not (keras_home / "models" / FILE_NAME).exists()  # no partial file left in the cache
