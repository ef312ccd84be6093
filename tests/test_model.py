import keras
import numpy as np
import pytest

import synthetic
from pneumonia import model as model_lib
from pneumonia import train

SIZE = 32


@pytest.fixture
def net():
    keras.utils.set_random_seed(0)
    return model_lib.build(SIZE, "none", dropout=0.0)


def _images(n=16, seed=0):
    arrays = synthetic.make_arrays(seed)
    from pneumonia.data import resize_images

    return resize_images(arrays["train_images"][:n], SIZE, "bilinear")[..., None], arrays["train_labels"][:n, 0].astype("int32")


def _trainable_names(model):
    return {layer.name for layer in model.layers if layer.trainable and layer.weights}


def test_model_takes_raw_pixels_and_outputs_probabilities(net):
    x, _ = _images(4)
    p = net.predict(x, verbose=0)
    assert p.shape == (4, 1) and np.all((p > 0) & (p < 1))
    assert net.input.shape[1:] == (SIZE, SIZE, 1)
    assert net.output.dtype == "float32"


def test_phase1_trains_only_the_head(net):
    model_lib.set_trainable(net, None, train_batchnorm=False)
    assert _trainable_names(net) == {"logit"}


def test_phase2_unfreezes_from_block_with_batchnorm_frozen(net):
    model_lib.set_trainable(net, "conv5_block1", train_batchnorm=False)
    names = _trainable_names(net)
    assert "conv5_block1_1_conv" in names and "conv5_block3_3_conv" in names and "logit" in names
    assert not any(n.startswith(("conv4", "conv3", "conv2", "conv1")) for n in names)
    assert not any(isinstance(net.get_layer(n), keras.layers.BatchNormalization) for n in names)
    # Without pretrained statistics BatchNorm may train too.
    model_lib.set_trainable(net, "conv5_block1", train_batchnorm=True)
    assert "conv5_block1_1_bn" in _trainable_names(net)
    model_lib.set_trainable(net, "conv1", train_batchnorm=True)
    assert {"conv1_conv", "conv1_bn", "conv2_block1_1_conv"} <= _trainable_names(net)


@pytest.mark.slow  # over 10 s: make test only
def test_prefix_and_suffix_compose_to_the_model(net):
    x, _ = _images(8)
    for block in (None, "conv4_block1", "conv5_block1"):
        prefix, suffix = model_lib.split(net, block)
        full = net.predict(x, verbose=0)
        np.testing.assert_allclose(suffix.predict(prefix.predict(x, verbose=0), verbose=0), full, rtol=1e-5, atol=1e-6)
    prefix, suffix = model_lib.split(net, "conv1")
    assert prefix is None and suffix is net


def test_float16_cache_changes_logits_by_little(net):
    x, _ = _images(8)
    logit_net = model_lib.logits_model(net)
    layer = net.get_layer(model_lib.LOGIT)
    kernel, bias = layer.get_weights()
    untrained = logit_net.predict(x, verbose=0).reshape(-1)
    # An untrained head gives nearly equal logits, so any tolerance would pass; spread them over
    # several units around 0, as a trained head's are.
    scale = 3.0 / untrained.std()
    layer.set_weights([kernel * scale, (bias - untrained.mean()) * scale])
    full = logit_net.predict(x, verbose=0).reshape(-1)
    assert full.std() > 1 and abs(full.mean()) < 0.1

    prefix, suffix = model_lib.split(logit_net, "conv5_block1")
    cached = train.cache_activations(prefix, x, "float16", "test")
    assert cached.dtype == np.float16
    from_cache = suffix.predict(cached, verbose=0).reshape(-1)
    assert not np.array_equal(from_cache, full)  # the float16 rounding reaches the logits: the bound measures it
    np.testing.assert_allclose(from_cache, full, rtol=0, atol=0.01 * full.std())


def test_cache_runs_the_prefix_at_one_shape_and_drops_the_padding(net):
    x, _ = _images(70)  # not a multiple of the chunk: 3 chunks of 24, the last padded with 2 blank images
    assert train.chunk_size(70) == 24 and train.chunk_size(32) == 32 and train.chunk_size(33) == 17
    prefix, _ = model_lib.split(net, None)
    shapes = []
    original = prefix.predict_on_batch
    prefix.predict_on_batch = lambda batch: shapes.append(batch.shape[0]) or original(batch)
    cached = train.cache_activations(prefix, x, "float32", "test")
    assert shapes == [24, 24, 24] and cached.shape == (70, 2048)
    pooled = keras.Model(net.input, net.get_layer(model_lib.POOL).output).predict(x, batch_size=70, verbose=0)
    np.testing.assert_allclose(cached, pooled, rtol=1e-4, atol=1e-5)


def test_saved_model_reloads_safely_with_same_outputs(net, tmp_path):
    x, _ = _images(4)
    path = tmp_path / "m.keras"
    train.save(net, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]  # no temporary left over
    again = model_lib.load(path)
    np.testing.assert_allclose(again.predict(x, verbose=0), net.predict(x, verbose=0), rtol=1e-6)
