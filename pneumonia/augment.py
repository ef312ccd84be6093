"""Training-time augmentation: small random translation, rotation, zoom and contrast changes.

No flips: the heart sits on one side of a chest X-ray. Validation and test images are never augmented.
Two routes, chosen by what is frozen (pneumonia.train):
- nothing frozen: each training batch is augmented where batches are made (train.Batches), from seeds fixed by
  (seed, epoch, batch), so each epoch sees new images and the compiled train step keeps XLA (these Keras
  layers do not support jit, and inside the model would switch it off for the whole step);
- a frozen prefix: `view` draws K fixed augmented copies of the training set, whose prefix activations are
  cached once; epoch e trains on copy e mod K.
Test-time augmentation (evaluate.tta) scores validation and test images on fixed views drawn the same way
(tta_views).
"""
from __future__ import annotations

import types

import keras
import numpy as np

# Views draw from seeds fixed by (seed, view, chunk): a view never depends on the others or on the order of drawing.
_SEED_SPACE = 2**31 - 1


def layers(augment, seed: int) -> list:
    """The augmentation layers, in float32 (also under mixed precision), on raw 0..255 pixels."""
    return [
        keras.layers.RandomTranslation(augment.translate, augment.translate, fill_mode="nearest", seed=seed,
                                       dtype="float32", name="augment_translate"),
        keras.layers.RandomRotation(augment.rotate, fill_mode="nearest", seed=seed + 1, dtype="float32",
                                    name="augment_rotate"),
        keras.layers.RandomZoom(augment.zoom, fill_mode="nearest", seed=seed + 2, dtype="float32",
                                name="augment_zoom"),
        keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), seed=seed + 3, dtype="float32",
                                    name="augment_contrast"),
    ]


def describe(augment, frozen_prefix: bool) -> str:
    """How the training images are augmented, in words (stage output and model card)."""
    if augment is None or not augment.enabled:
        return "no augmentation"
    what = (f"augmented (translation {augment.translate:g}, rotation {augment.rotate:g} turn, zoom {augment.zoom:g}, "
            f"contrast {augment.contrast:g}; no flips)")
    if frozen_prefix:
        return f"{what}: {augment.views} views cached through the frozen layers, epoch e on view e mod {augment.views}"
    return f"{what} on the fly, new every epoch"


def transform(augment_layers: list, images: np.ndarray, seed: int, view_index: int, chunk_index: int) -> np.ndarray:
    """Chunk `chunk_index` of augmented view `view_index`, from seeds fixed by (seed, view, chunk), as float32.

    On the fly, the view is the epoch and the chunk the batch."""
    x = keras.ops.convert_to_tensor(images, "float32")
    base = int(np.random.default_rng([seed, view_index, chunk_index]).integers(_SEED_SPACE))
    for number, layer in enumerate(augment_layers):
        transformation = layer.get_random_transformation(x, training=True, seed=base + number)
        x = layer.transform_images(x, transformation, training=True)
    return keras.ops.convert_to_numpy(x)


def view(augment_layers: list, images: np.ndarray, seed: int, view_index: int, chunk: int) -> np.ndarray:
    """The whole augmented view `view_index` of `images`, `chunk` images at a time: what the K-view cache feeds
    the frozen prefix, chunk by chunk (a test's plain fit of the full model reads it from here)."""
    return np.concatenate([transform(augment_layers, images[start : start + chunk], seed, view_index, index)
                           for index, start in enumerate(range(0, len(images), chunk))])


def tta_views(record: dict, images: np.ndarray):
    """The views test-time augmentation `record` (metrics.json's tta) scores `images` on, one array each.

    View 0 is the images themselves; view k one transformation drawn as `transform` draws it from (seed, k), the
    same for every image (each is transformed alone), so an image's views do not depend on what it is scored
    with: pneumonia.predict gets the views the evaluate stage used.
    """
    yield images
    if record["views"] > 1:
        augment_layers = layers(types.SimpleNamespace(**record), record["seed"])
    for k in range(1, record["views"]):
        yield np.concatenate([transform(augment_layers, image[None], record["seed"], k, 0) for image in images])
