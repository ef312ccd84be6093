"""One typed schema for params.yaml: loaded and validated once, up front.

Every stage calls `load()`; a typo, a wrong type or an out-of-range value
stops the stage with a message naming the key, before any work is done.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pneumonia.errors import PipelineError

# ResNet-50 block names that `fine_tune.unfreeze_from` may name (the stem is "conv1").
RESNET50_BLOCKS = ("conv1",) + tuple(
    f"conv{stage}_block{block}"
    for stage, blocks in ((2, 3), (3, 4), (4, 6), (5, 3))
    for block in range(1, blocks + 1)
)


@dataclass(frozen=True)
class DataParams:
    source: str = "medmnist"  # "medmnist" downloads; anything else is a local .npz path
    # Source resolution: 28 (MedMNIST v2) or MedMNIST+'s native 64, 128, 224 px (the file, downloaded or local).
    size: Literal[28, 64, 128, 224] = 28


@dataclass(frozen=True)
class ResizeParams:
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bilinear"


@dataclass(frozen=True)
class ModelParams:
    weights: Literal["imagenet", "none"] = "imagenet"
    dropout: float = 0.2


@dataclass(frozen=True)
class AugmentParams:
    """Training-time augmentation (pneumonia.augment); no flips: the heart sits on one side."""
    enabled: bool = False
    translate: float = 0.08  # fraction of the image size, up and down, left and right
    rotate: float = 0.03  # fraction of a full turn, either way
    zoom: float = 0.1  # fraction in or out
    contrast: float = 0.15  # contrast factor drawn from [1 - c, 1 + c]
    # Acquisition shift (pneumonia.augment.AcquisitionShift), each 0 (off) by default:
    blur: float = 0.0  # Gaussian blur, sigma up to this many pixels, on half the images
    gamma: float = 0.0  # gamma curve, gamma drawn from [1 / (1 + g), 1 + g]
    brightness: float = 0.0  # exposure shift, up to this fraction of the pixel range either way
    noise: float = 0.0  # Gaussian noise, standard deviation up to this fraction of the pixel range
    # With a frozen prefix (phase 1 always, phase 2 unless it trains from conv1): K augmented views of each
    # training image are run through the prefix once and cached; epoch e trains on view e mod K.
    views: int = 4


Schedule = Literal["constant", "cosine"]
# Which epoch's weights a phase keeps: the best validation AUC or loss (early stopping after `patience` epochs
# without a better one), or the last epoch (every epoch runs).
Keep = Literal["val_auc", "val_loss", "last"]


@dataclass(frozen=True)
class TrainHeadParams:
    epochs: int = 10  # 0 skips phase 1 (the head starts phase 2 untrained; useful from scratch)
    patience: int = 5  # epochs without a better kept metric before stopping
    schedule: Schedule = "constant"  # cosine: decay from the lr to 0 over the epochs after warmup
    warmup_epochs: int = 0  # cosine only: rise linearly from 0 to the lr over these first epochs
    keep: Keep = "val_auc"
    # Weight averaging: validate, keep and save the exponential moving average of the weights (Keras's
    # use_ema) with this momentum per step; 0: off, the raw weights.
    ema: float = 0.0
    # Train towards 1 - s/2 and s/2 instead of 1 and 0 (Keras's BinaryCrossentropy(label_smoothing)); 0: off.
    label_smoothing: float = 0.0
    # MixUp's alpha: each training batch mixed with a permutation of itself (Keras's MixUp); 0: off.
    mixup: float = 0.0


@dataclass(frozen=True)
class FineTuneParams:
    epochs: int = 10
    lr: float = 1e-5
    # auto: conv5_block1 with ImageNet weights (the pretrained early blocks stay frozen), conv1 without them
    # (random blocks left frozen would never learn anything).
    unfreeze_from: str = "auto"
    patience: int = 5
    schedule: Schedule = "constant"
    warmup_epochs: int = 0
    keep: Keep = "val_auc"
    ema: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0


@dataclass(frozen=True)
class ComputeParams:
    # auto: on when a GPU is visible, off on CPU.
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    jit_compile: Literal["auto", "on", "off"] = "auto"
    distribute: Literal["auto", "none", "mirrored"] = "auto"
    cache_dtype: Literal["float16", "float32"] = "float16"


@dataclass(frozen=True)
class ThresholdParams:
    strategy: Literal["target_sensitivity", "youden", "fixed"] = "target_sensitivity"
    target_sensitivity: float = 0.95
    value: float = 0.5  # used by strategy "fixed"


@dataclass(frozen=True)
class BootstrapParams:
    samples: int = 2000


@dataclass(frozen=True)
class EvaluateParams:
    threshold: ThresholdParams = field(default_factory=ThresholdParams)
    # platt: the lowest 5-fold cross-validated NLL on validation of the three, over the reference runs (README)
    calibration: Literal["temperature", "platt", "none"] = "platt"
    # The share of pneumonia the calibrated probabilities are for: the log-odds move by logit(prevalence) -
    # logit(validation's share) after the fit (metrics.prevalence_shift); validation: no shift.
    # Default 0.5, even odds: validation's 74% (training's too) is how the dataset was collected, not a
    # population, and test's share is a property of that test set (choosing it would fit test). At 0.5 the
    # probability is LR / (1 + LR) for the likelihood ratio LR, which any population's prior odds multiply;
    # a number states the population the model is deployed to.
    prevalence: float | Literal["validation"] = 0.5
    bootstrap: BootstrapParams = field(default_factory=BootstrapParams)
    # Test-time augmentation: each validation and test logit is the mean over this many views, the image and
    # tta - 1 fixed transformations drawn with augment's ranges (pneumonia.augment.tta_views); 1: off.
    tta: int = 1


@dataclass(frozen=True)
class ErrorAnalysisParams:
    cases: int = 12


@dataclass(frozen=True)
class Params:
    seed: int = 42
    lr: float = 1e-4  # head learning rate (phase 1)
    image_size: int = 224
    batch_size: int = 32
    data: DataParams = field(default_factory=DataParams)
    resize: ResizeParams = field(default_factory=ResizeParams)
    model: ModelParams = field(default_factory=ModelParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    train_head: TrainHeadParams = field(default_factory=TrainHeadParams)
    fine_tune: FineTuneParams = field(default_factory=FineTuneParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    error_analysis: ErrorAnalysisParams = field(default_factory=ErrorAnalysisParams)


# Range checks: key -> (predicate, what the value must be).
_RULES = {
    "seed": (lambda v: 0 <= v <= 2**32 - 1, "between 0 and 4294967295 (2**32 - 1, NumPy's limit)"),
    "lr": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "image_size": (lambda v: 32 <= v <= 1024, "between 32 and 1024"),
    "batch_size": (lambda v: 1 <= v <= 4096, "between 1 and 4096"),
    "data.source": (lambda v: v.strip() != "", "'medmnist' or a path to a local .npz"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "augment.translate": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "augment.rotate": (lambda v: 0 <= v <= 0.5, "in [0, 0.5] (a fraction of a full turn)"),
    "augment.zoom": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "augment.contrast": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "augment.blur": (lambda v: 0 <= v <= 5, "in [0, 5] pixels (0: off)"),
    "augment.gamma": (lambda v: 0 <= v <= 1, "in [0, 1] (0: off)"),
    "augment.brightness": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "augment.noise": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "augment.views": (lambda v: 1 <= v <= 64, "between 1 and 64"),
    "train_head.epochs": (lambda v: v >= 0, "at least 0 (0 skips phase 1)"),
    "train_head.warmup_epochs": (lambda v: v >= 0, "at least 0"),
    "fine_tune.warmup_epochs": (lambda v: v >= 0, "at least 0"),
    "train_head.patience": (lambda v: v >= 1, "at least 1"),
    "fine_tune.epochs": (lambda v: v >= 1, "at least 1"),
    "fine_tune.lr": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "fine_tune.unfreeze_from": (lambda v: v == "auto" or v in RESNET50_BLOCKS,
                                "auto or a ResNet-50 block name: " + ", ".join(RESNET50_BLOCKS)),
    "fine_tune.patience": (lambda v: v >= 1, "at least 1"),
    "train_head.ema": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "fine_tune.ema": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "train_head.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "fine_tune.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "train_head.mixup": (lambda v: 0 <= v <= 10, "in [0, 10] (MixUp's alpha; 0: off)"),
    "fine_tune.mixup": (lambda v: 0 <= v <= 10, "in [0, 10] (MixUp's alpha; 0: off)"),
    "evaluate.threshold.target_sensitivity": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "evaluate.threshold.value": (lambda v: 0 < v < 1, "in (0, 1)"),
    "evaluate.prevalence": (lambda v: v == "validation" or 0 < v < 1,
                            "a share of pneumonia in (0, 1), or validation (validation's own: no shift)"),
    "evaluate.bootstrap.samples": (lambda v: v >= 0, "at least 0 (0 turns confidence intervals off)"),
    "evaluate.tta": (lambda v: 1 <= v <= 64, "between 1 and 64 (1: no test-time augmentation)"),
    "error_analysis.cases": (lambda v: 1 <= v <= 100, "between 1 and 100"),
}


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's floats and booleans, as DVC (ruamel, YAML 1.2) writes params.yaml.

    `dvc exp run -S lr=1e-5` writes `1e-05`, a string to YAML 1.1; `-S compute.mixed_precision=off` writes a plain
    `off`, which YAML 1.1 reads as False (and on/yes/no alike). Here only true/false are booleans.
    """


# YAML 1.1's boolean resolver out, YAML 1.2's (true/false in three spellings) in.
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _coerce(value, hint, key: str):
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise PipelineError(f"params: {key} is {value!r}; use one of: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm, key)
            except PipelineError:
                pass
        raise PipelineError(f"params: {key} is {value!r}; it must be {_RULES[key][1]}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise PipelineError(
            f"params: {key} must be of type {hint.__name__}, got {type(value).__name__} {value!r}; fix it in params.yaml"
        )
    return float(value) if hint is float else value


def _build(cls, data, prefix: str = ""):
    where = prefix or "params.yaml"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"params: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may mix types (1, foo)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise PipelineError(f"params: unknown key {key}; known keys here: {', '.join(sorted(names))}")
    values = {}
    for name in names & set(data):
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(data[name], hints[name], key)
        if key in _RULES:
            check, wanted = _RULES[key]
            if not check(values[name]):
                raise PipelineError(f"params: {key} is {values[name]!r}; it must be {wanted}")
    return cls(**values)


# The params each stage reads, that is the ones that can change its outputs: exactly its `params:` in dvc.yaml
# (a test holds them equal). A stage sees only these (`for_stage`); its resume key and the records its outputs
# state are built from them.
STAGE_PARAMS = {
    "download": ("data.source", "data.size"),
    "resize": ("data.size", "image_size", "resize.interpolation"),
    "train_head": ("seed", "lr", "batch_size", "model", "augment", "train_head",
                   "compute.mixed_precision", "compute.jit_compile", "compute.distribute"),
    "fine_tune": ("seed", "batch_size", "model.weights", "augment", "fine_tune", "compute"),
    # augment's ranges draw the test-time augmentation views (evaluate.tta).
    "evaluate": ("seed", "batch_size", "augment.translate", "augment.rotate", "augment.zoom", "augment.contrast",
                 "evaluate"),
    "error_analysis": ("seed", "error_analysis"),
}


def unfreeze_block(unfreeze_from: str, weights: str) -> str:
    """The first block that fine_tune trains; `auto` follows the weights."""
    if unfreeze_from != "auto":
        return unfreeze_from
    return "conv5_block1" if weights == "imagenet" else "conv1"


class StageParams:
    """A read-only view of the params holding only those one stage lists in dvc.yaml.

    Reading any other param raises: a stage that used a param DVC does not track for it would
    not rerun when that param changes.
    """

    def __init__(self, value, stage: str, prefix: str = ""):
        self._value, self._stage, self._prefix = value, stage, prefix

    def listed(self) -> dict:
        """The stage's params as {dotted key: value} (a group's value is a plain dict)."""
        out = {}
        for key in STAGE_PARAMS[self._stage]:
            value = self._value
            for part in key.split("."):
                value = getattr(value, part)
            out[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        key = self._prefix + name
        value = getattr(self._value, name)
        listed = STAGE_PARAMS[self._stage]
        if any(key == k or key.startswith(k + ".") for k in listed):
            return value
        if any(k.startswith(key + ".") for k in listed):
            return StageParams(value, self._stage, key + ".")
        raise AttributeError(f"stage {self._stage} reads {key}, which is not among its params in dvc.yaml "
                             f"({', '.join(listed)})")


def for_stage(params: Params, stage: str) -> StageParams:
    return StageParams(params, stage)


def from_dict(data: dict) -> Params:
    params = _build(Params, data)
    for name in ("train_head", "fine_tune"):
        phase = getattr(params, name)
        if phase.schedule == "cosine" and phase.epochs and phase.warmup_epochs >= phase.epochs:
            raise PipelineError(f"params: {name}.warmup_epochs is {phase.warmup_epochs}; it must be less than "
                                f"{name}.epochs ({phase.epochs}), or the cosine decay never starts")
    return params


def load(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; missing keys take the schema's defaults."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PipelineError(f"params: cannot read {path} ({exc.strerror}); run from the project root") from None
    try:
        data = yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as exc:
        raise PipelineError(f"params: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    return from_dict(data)


def as_dict(params) -> dict:
    return dataclasses.asdict(params)
