"""ResNet-50 with a new head, freezing rules, and the frozen-prefix / trainable-suffix split.

The model takes raw uint8-range grayscale pixels (N, S, S, 1): the 3-channel
expansion and ResNet-50's preprocessing are layers inside it, so a saved
.keras file is self-contained.
"""
from __future__ import annotations

import keras

from pneumonia.errors import PipelineError
from pneumonia.params import RESNET50_BLOCKS

# resnet50.preprocess_input ("caffe" mode) subtracts these BGR means; the
# channels are identical copies of the gray image, so the BGR swap is a no-op.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
POOL = "avg_pool"
LOGIT = "logit"


def build(image_size: int, weights: str, dropout: float) -> keras.Model:
    inputs = keras.Input((image_size, image_size, 1), name="pixels")
    x = keras.layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    x = keras.layers.Normalization(mean=IMAGENET_BGR_MEAN, variance=(1.0, 1.0, 1.0), name="resnet50_preprocess")(x)
    try:
        backbone = keras.applications.ResNet50(
            include_top=False, weights=None if weights == "none" else weights, input_tensor=x, pooling="avg"
        )
    except Exception as exc:  # the weights download fails in many ways; all get the same advice
        raise PipelineError(
            f"model: could not load ResNet-50 {weights} weights ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "put resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 in ~/.keras/models/ or set model.weights=none "
            "to train from scratch"
        ) from None
    x = keras.layers.Dropout(dropout, name="head_dropout")(backbone.output)
    # The logit and the probability in float32 even under mixed precision: float16 logits are spaced 0.008 apart
    # at |logit| 8-16, which ties images at the threshold.
    x = keras.layers.Dense(1, dtype="float32", name=LOGIT)(x)
    outputs = keras.layers.Activation("sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name="pneumonia_resnet50")


def with_policy(model: keras.Model, policy: str) -> keras.Model:
    """`model` (as `build` makes it), its layers computing under `policy` ("float32" or "mixed_float16").

    A layer keeps the policy it was built under, also when saved and loaded, so this builds the network anew
    under `policy` and copies the weights (always float32 variables). The logit and probability stay float32.
    """
    if all(layer.dtype_policy.name == policy for layer in model.layers if layer.name not in (LOGIT, "probability")):
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        rebuilt = build(model.input.shape[1], "none", model.get_layer("head_dropout").rate)
    finally:
        keras.config.set_dtype_policy(previous)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def boundary(model: keras.Model, block: str | None):
    """The tensor where the trainable part starts: the input of `block`, or the pooled features (None)."""
    if block is None:
        return model.get_layer(POOL).output
    first = next(layer for layer in model.layers if layer.name.startswith(block + "_"))
    return first.input


def split(model: keras.Model, block: str | None) -> tuple[keras.Model | None, keras.Model]:
    """(prefix, suffix) sharing the model's layers: suffix(prefix(x)) == model(x).

    From "conv1" everything with weights trains, so there is no prefix (None).
    """
    if block == "conv1":
        return None, model
    cut = boundary(model, block)
    return keras.Model(model.input, cut, name="frozen_prefix"), keras.Model(cut, model.output, name="trainable_suffix")


def set_trainable(model: keras.Model, block: str | None, train_batchnorm: bool) -> None:
    """Freeze everything before `block` (None: the whole backbone); BatchNorm stays frozen unless asked."""
    _, suffix = split(model, block)
    trainable = {id(layer) for layer in suffix.layers}
    model.trainable = True
    for layer in model.layers:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        # Keras 3 runs a frozen BatchNormalization in inference mode, which keeps pretrained statistics intact.
        layer.trainable = id(layer) in trainable and (train_batchnorm or not is_bn)


def describe_trainable(block: str, weights: str, train_batchnorm: bool) -> str:
    """What phase 2 trains, in words: which blocks, from which weights, and whether BatchNorm learns."""
    start = "random weights" if weights == "none" else "ImageNet weights"
    batchnorm = "BatchNorm trains too" if train_batchnorm else "BatchNorm frozen (inference mode)"
    if block == "conv1":
        return f"every layer trains (conv1 to conv5_block3 and the head, from {start}); {batchnorm}"
    frozen = RESNET50_BLOCKS[RESNET50_BLOCKS.index(block) - 1]
    kept = "never trained" if weights == "none" else "as pretrained"
    return (f"{block} to conv5_block3 and the head train; conv1 to {frozen} stay frozen with {start} ({kept}); "
            f"{batchnorm}")


def logits_model(model: keras.Model, source=None) -> keras.Model:
    """Same weights, outputs the pre-sigmoid logit (for temperature scaling); `source` names the model in errors."""
    if model.layers[-1].name == LOGIT:  # already one (the evaluate stage makes one for both splits)
        return model
    try:
        logit = model.get_layer(LOGIT)
    except ValueError:
        raise PipelineError(
            f"model: {source or model.name} has no '{LOGIT}' layer; it is not a model trained by this pipeline, "
            "retrain with dvc repro"
        ) from None
    return keras.Model(model.input, logit.output)


def load(path, for_training: bool = False) -> keras.Model:
    """A saved model; safe_mode refuses anything that could run arbitrary code on load.

    Saved in float32 (train.save); `for_training` rebuilds it under this process's precision policy.
    """
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"model: cannot load {path} ({str(exc).splitlines()[0]}); run dvc repro to train it") from None
    return with_policy(model, keras.config.dtype_policy().name) if for_training else model
