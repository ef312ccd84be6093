"""Grad-CAM of the pneumonia logit at the last ResNet-50 block (conv5_block3_out).

The model is cut at conv5_block3_out the way pneumonia.model.split cuts it:
two models sharing the trained layers, features(x) -> conv activations and
head(conv activations) -> logit. The gradient of the logit with respect to
the conv activations comes from the backend's own autodiff (GradientTape on
TensorFlow, jax.grad on JAX); everything else is keras.ops.

Heatmap = ReLU(sum over channels of (spatial mean of the gradient) x activation),
upsampled bilinearly to the input size and divided by its maximum, so each
image's map lies in [0, 1] (all zeros when nothing speaks for pneumonia).
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from pneumonia.errors import PipelineError
from pneumonia.model import LOGIT
from pneumonia.progress import progress

LAST_CONV = "conv5_block3_out"
BATCH = 32  # images per forward/backward pass; bounds memory, does not change the result

# heat_outside_lung counts the heat outside a centered box this tall and wide (fractions of
# the image): a crude stand-in for the lung fields of a center-cropped frontal chest X-ray.
LUNG_BOX_HEIGHT, LUNG_BOX_WIDTH = 0.8, 0.7


def split_at_last_conv(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(features, head) sharing the model's layers: head(features(x)) is the logit."""
    try:
        conv, logit = model.get_layer(LAST_CONV).output, model.get_layer(LOGIT).output
    except ValueError:
        raise PipelineError(f"model: {model.name} has no {LAST_CONV} or {LOGIT} layer; Grad-CAM needs the pipeline's "
                            "ResNet-50, retrain it with dvc repro") from None
    return keras.Model(model.input, conv, name="gradcam_features"), keras.Model(conv, logit, name="gradcam_head")


def _logit_gradient(head: keras.Model, features):
    """d logit / d features for each image; the images are independent, so the gradient of the batch sum is per image."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(features)
            logits = head(features, training=False)
        return tape.gradient(logits, features)
    if backend == "jax":
        import jax

        return jax.grad(lambda f: ops.sum(head(f, training=False)))(features)
    raise PipelineError(f"gradcam: the {backend} backend is not supported; use KERAS_BACKEND=tensorflow or jax")


def heatmaps(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Grad-CAM maps (N, H, W) float32 in [0, 1] for images (N, H, W, 1) in the model's input format."""
    features_model, head = split_at_last_conv(model)
    size = images.shape[1:3]
    out = np.zeros((len(images), *size), dtype="float32")
    with progress(len(images), "Grad-CAM") as report:
        for start in range(0, len(images), BATCH):
            features = ops.cast(features_model(images[start : start + BATCH], training=False), "float32")
            grads = ops.cast(_logit_gradient(head, features), "float32")
            channel_weights = ops.mean(grads, axis=(1, 2), keepdims=True)
            cam = ops.relu(ops.sum(channel_weights * features, axis=-1, keepdims=True))
            cam = ops.image.resize(cam, size, interpolation="bilinear", data_format="channels_last")
            peak = ops.max(cam, axis=(1, 2, 3), keepdims=True)
            cam = cam / ops.maximum(peak, 1e-12)  # an all-zero map stays zero
            out[start : start + len(cam)] = ops.convert_to_numpy(cam)[..., 0]
            report(start + len(cam))
    return np.clip(out, 0.0, 1.0)


def lung_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the centered box, in pixels."""
    top, left = round(height * (1 - LUNG_BOX_HEIGHT) / 2), round(width * (1 - LUNG_BOX_WIDTH) / 2)
    return top, height - top, left, width - left


def heat_outside_lung(heatmap: np.ndarray) -> float:
    """Fraction of the heatmap's mass outside the centered lung box; NaN for an all-zero map."""
    total = float(heatmap.sum())
    if total <= 0:
        return float("nan")
    top, bottom, left, right = lung_box(*heatmap.shape)
    return 1.0 - float(heatmap[top:bottom, left:right].sum()) / total
