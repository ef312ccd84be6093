"""Training-time augmentation: small random translation, rotation, zoom and contrast changes, and optionally the
changes another scanner or exposure makes (blur, gamma, brightness, noise: AcquisitionShift).

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
    shift = AcquisitionShift(augment)
    return geometric_layers(augment, seed) + ([shift] if shift.active else [])


def geometric_layers(augment, seed: int) -> list:
    """Translation, rotation, zoom and contrast: what the test-time views are drawn with (tta_views)."""
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


class AcquisitionShift:
    """What another scanner, exposure or patient motion does to an X-ray, drawn per image: a Gaussian blur (sigma up
    to augment.blur pixels, on half the images), a gamma curve (gamma in [1 / (1 + g), 1 + g]), an exposure shift
    (up to augment.brightness of the pixel range) and sensor noise (standard deviation up to augment.noise of the
    range), clipped to 0..255.

    Keras's RandomGaussianBlur and RandomBrightness are not used: given one integer seed, as `transform` gives
    each layer, RandomGaussianBlur draws its per-image blur chance and the coin it compares with from the same
    stream, so with `factor` a single number it never blurs (Keras 3.15); and neither has gamma or noise. The
    draws here come from one NumPy generator seeded like the other layers.
    """

    def __init__(self, augment):
        self.augment = augment
        self.active = any((augment.blur, augment.gamma, augment.brightness, augment.noise))

    def get_random_transformation(self, images, training=True, seed=None):
        a, rng, n = self.augment, np.random.default_rng(seed), int(images.shape[0])
        blurred = rng.random(n) < 0.5
        log_gamma = np.log1p(a.gamma)
        transformation = {"sigma": np.where(blurred, rng.uniform(0, a.blur, n), 0.0),
                          "gamma": np.exp(rng.uniform(-log_gamma, log_gamma, n)),
                          "shift": rng.uniform(-a.brightness, a.brightness, n) * 255, "noise": 0.0}
        if a.noise:  # the last draws (in the order the round-2 runs made them): skipped when off, nothing else moves
            unit = rng.standard_normal(tuple(images.shape))
            transformation["noise"] = unit * rng.uniform(0, a.noise, n)[:, None, None, None] * 255
        return transformation

    def transform_images(self, images, transformation, training=True):
        x = _blur(np.array(keras.ops.convert_to_numpy(images), dtype="float32"), transformation["sigma"])
        x = 255 * (np.clip(x, 0, 255) / 255) ** transformation["gamma"][:, None, None, None]
        x = x + transformation["shift"][:, None, None, None] + transformation["noise"]
        return np.clip(x, 0, 255).astype("float32")


def _blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Each image of `x` (N, H, W, C) blurred by a Gaussian of its own sigma (0: unchanged), separably, edges
    reflected. Vectorised over the batch: keras.ops.image.gaussian_blur takes one sigma per call, and a call per
    image cost three times the rest of augmentation."""
    radius = int(np.ceil(2 * sigma.max()))  # two sigmas either side of the centre
    if radius == 0:
        return x
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / np.maximum(sigma, 1e-6)[:, None]) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)  # (N, taps); sigma 0 leaves the centre tap alone
    for axis in (1, 2):
        padded = np.pad(x, [(0, 0)] + [(radius, radius) if a == axis else (0, 0) for a in (1, 2)] + [(0, 0)],
                        mode="reflect")
        size = x.shape[axis]
        x = sum(weights[:, t, None, None, None] * np.take(padded, np.arange(t, t + size), axis=axis)
                for t in range(len(offsets)))
    return x


def describe(augment, frozen_prefix: bool) -> str:
    """How the training images are augmented, in words (stage output and model card)."""
    if augment is None or not augment.enabled:
        return "no augmentation"
    acquisition = (f"; blur sigma {augment.blur:g} px, gamma {augment.gamma:g}, brightness {augment.brightness:g}, "
                   f"noise {augment.noise:g}" if AcquisitionShift(augment).active else "")
    what = (f"augmented (translation {augment.translate:g}, rotation {augment.rotate:g} turn, zoom {augment.zoom:g}, "
            f"contrast {augment.contrast:g}{acquisition}; no flips)")
    if frozen_prefix:
        return f"{what}: {augment.views} views cached through the frozen layers, epoch e on view e mod {augment.views}"
    return f"{what} on the fly, new every epoch"


def _base_seed(seed: int, view_index: int, chunk_index: int) -> int:
    """The first layer's seed for chunk `chunk_index` of view `view_index`; layer n gets this + n."""
    return int(np.random.default_rng([seed, view_index, chunk_index]).integers(_SEED_SPACE))


def transform(augment_layers: list, images: np.ndarray, seed: int, view_index: int, chunk_index: int) -> np.ndarray:
    """Chunk `chunk_index` of augmented view `view_index`, from seeds fixed by (seed, view, chunk), as float32.

    On the fly, the view is the epoch and the chunk the batch."""
    x = keras.ops.convert_to_tensor(images, "float32")
    base = _base_seed(seed, view_index, chunk_index)
    for number, layer in enumerate(augment_layers):
        transformation = layer.get_random_transformation(x, training=True, seed=base + number)
        x = layer.transform_images(x, transformation, training=True)
    return keras.ops.convert_to_numpy(x)


def mixup(images: np.ndarray, labels: np.ndarray, class_weight: dict, alpha: float, seed: int, epoch: int,
          batch: int):
    """Keras's MixUp of a training batch with a permutation of itself, from a seed fixed by (seed, epoch, batch):
    (images, soft labels, sample weights).

    Each row's class weight is mixed with its label: λ·w_i·BCE(p, y_i) + (1 - λ)·w_j·BCE(p, y_j), the weighted
    loss of the pair, equals W·BCE(p, ỹ) with W = λ·w_i + (1 - λ)·w_j and ỹ = (λ·w_i·y_i + (1 - λ)·w_j·y_j) / W,
    since BCE is linear in its target. `images` may be cached activations of any rank (manifold mixup at the
    frozen prefix's output); they keep their dtype.
    """
    layer = keras.layers.MixUp(alpha)
    weights = np.where(labels == 1, class_weight[1], class_weight[0]).astype("float32")
    x = keras.ops.convert_to_tensor(images.reshape(len(images), 1, 1, -1), "float32")  # MixUp takes 4-D batches
    transformation = layer.get_random_transformation(x, training=True, seed=_base_seed(seed, epoch, batch))
    mixed = keras.ops.convert_to_numpy(layer.transform_images(x, transformation, training=True))
    targets = keras.ops.convert_to_tensor(np.stack([weights * labels, weights], axis=1), "float32")
    weighted_label, weight = keras.ops.convert_to_numpy(layer.transform_labels(targets, transformation)).T
    return mixed.reshape(images.shape).astype(images.dtype), (weighted_label / weight).astype("float32"), weight


def view(augment_layers: list, images: np.ndarray, seed: int, view_index: int, chunk: int) -> np.ndarray:
    """The whole augmented view `view_index` of `images`, `chunk` images at a time: what the K-view cache feeds
    the frozen prefix, chunk by chunk (a test's plain fit of the full model reads it from here)."""
    return np.concatenate([transform(augment_layers, images[start : start + chunk], seed, view_index, index)
                           for index, start in enumerate(range(0, len(images), chunk))])


def tta_views(record: dict, images: np.ndarray, chunk: int = 256):
    """The views test-time augmentation `record` (metrics.json's tta) scores `images` on, one array each.

    View 0 is the images themselves; view k one transformation drawn as `transform` draws it for a single image
    from (seed, k), then applied alike to every image, `chunk` at a time. So an image's views do not depend on what
    it is scored with: pneumonia.predict gets the views the evaluate stage used.
    """
    yield images
    if record["views"] > 1:
        augment_layers = geometric_layers(types.SimpleNamespace(**record), record["seed"])
    for k in range(1, record["views"]):
        base = _base_seed(record["seed"], k, 0)
        one = keras.ops.zeros((1, *images.shape[1:]), "float32")  # the geometric draws depend on the shape only
        drawn = [layer.get_random_transformation(one, training=True, seed=base + n) for n, layer in enumerate(augment_layers)]
        parts = []
        for start in range(0, len(images), chunk):
            x = keras.ops.convert_to_tensor(images[start : start + chunk], "float32")
            for layer, transformation in zip(augment_layers, drawn):
                x = layer.transform_images(x, _for_batch(transformation, int(x.shape[0])), training=True)
            parts.append(keras.ops.convert_to_numpy(x))
        yield np.concatenate(parts)


def _for_batch(transformation: dict, n: int) -> dict:
    """One image's transformation (a Keras layer's get_random_transformation on a batch of 1) for a batch of n."""
    out = {}
    for key, value in transformation.items():
        if key == "input_shape":
            out[key] = (n, *value[1:])
        elif key == "batch_size":
            out[key] = n
        elif hasattr(value, "shape") and len(value.shape) and value.shape[0] == 1:
            out[key] = keras.ops.repeat(value, n, axis=0)
        else:
            out[key] = value
    return out
