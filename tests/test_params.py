import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumonia import params as params_lib
from pneumonia.errors import PipelineError
from conftest import ROOT


def test_committed_params_match_schema_defaults():
    assert params_lib.load(ROOT / "params.yaml") == params_lib.Params()


def test_dvc_exponent_style_reads_as_float(tmp_path):
    # `dvc exp run -S lr=1e-5` writes this; plain PyYAML reads it as the string "1e-05".
    path = tmp_path / "params.yaml"
    path.write_text("lr: 1e-05\nfine_tune:\n  lr: 2E-5\n")
    assert yaml.safe_load(path.read_text())["lr"] == "1e-05"
    p = params_lib.load(path)
    assert p.lr == 1e-5 and isinstance(p.lr, float)
    assert p.fine_tune.lr == 2e-5


@pytest.mark.parametrize(
    "text, key",
    [
        ("lr: -0.1", "lr"),
        ("lr: fast", "lr"),
        ("image_size: 16", "image_size"),
        ("image_size: 64.5", "image_size"),
        ("batch_size: true", "batch_size"),
        ("fine_tune:\n  unfreeze_from: conv9_block1", "fine_tune.unfreeze_from"),
        ("model:\n  weights: imagenet21k", "model.weights"),
        ("learning_rate: 0.1", "learning_rate"),
        ("train_head:\n  epochz: 3", "train_head.epochz"),
        ("evaluate:\n  threshold:\n    strategy: best", "evaluate.threshold.strategy"),
        ("model: 3", "model"),
        ("evaluate:\n  prevalence: 1.0", "evaluate.prevalence"),
        ("evaluate:\n  prevalence: 0", "evaluate.prevalence"),
        ("evaluate:\n  prevalence: training", "evaluate.prevalence"),
        ("evaluate:\n  prevalence: true", "evaluate.prevalence"),
        ("evaluate:\n  tta: 0", "evaluate.tta"),
        ("evaluate:\n  tta: 2.5", "evaluate.tta"),
        ("augment:\n  blur: -1", "augment.blur"),
        ("augment:\n  noise: 1.5", "augment.noise"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text + "\n")
    with pytest.raises(PipelineError) as err:
        params_lib.load(path)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_unfreeze_from_accepts_every_resnet50_block():
    assert len(params_lib.RESNET50_BLOCKS) == 17
    for block in params_lib.RESNET50_BLOCKS:
        assert params_lib.from_dict({"fine_tune": {"unfreeze_from": block}}).fine_tune.unfreeze_from == block


_FIELDS = {
    "lr": float, "seed": int, "image_size": int, "batch_size": int,
    "train_head.epochs": int, "fine_tune.lr": float, "model.dropout": float, "error_analysis.cases": int,
}


def _nest(key, value):
    head, *rest = key.split(".")
    return {head: _nest(".".join(rest), value) if rest else value}


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(sorted(_FIELDS)), value=st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2), st.none()))
def test_any_wrong_type_is_rejected_with_the_key(key, value):
    with pytest.raises(PipelineError, match=key.replace(".", r"\.")):
        params_lib.from_dict(_nest(key, value))


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0001, allow_infinity=False)))
def test_any_out_of_range_learning_rate_is_rejected(value):
    with pytest.raises(PipelineError, match="lr"):
        params_lib.from_dict({"lr": value})


@settings(max_examples=100, deadline=None)
@given(size=st.integers(min_value=32, max_value=1024), lr=st.floats(min_value=1e-8, max_value=1.0))
def test_any_valid_values_are_kept(size, lr):
    p = params_lib.from_dict({"image_size": size, "lr": lr})
    assert (p.image_size, p.lr) == (size, lr)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(min_value=2**32, max_value=2**128))
def test_any_seed_beyond_numpy_is_rejected(seed):
    with pytest.raises(PipelineError, match=r"params: seed is \d+; it must be between 0 and 4294967295"):
        params_lib.from_dict({"seed": seed})


@settings(max_examples=50, deadline=None)
@given(seed=st.one_of(st.just(2**32 - 1), st.integers(min_value=0, max_value=2**32 - 1)))
def test_any_accepted_seed_works_in_numpy(seed):
    np.random.seed(params_lib.from_dict({"seed": seed}).seed)  # what keras.utils.set_random_seed calls


# No field name starts with "x", so every key here is unknown.
_KEYS = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                  st.from_regex(r"x[a-z_]{0,7}", fullmatch=True))


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(["", "model", "evaluate.threshold"]),
       keys=st.sets(_KEYS, min_size=2, max_size=5).filter(lambda ks: len({type(k) for k in ks}) > 1))
def test_unknown_keys_of_mixed_types_are_named(section, keys):
    data = dict.fromkeys(keys, 1)
    with pytest.raises(PipelineError) as err:
        params_lib.from_dict(_nest(section, data) if section else data)
    first = (section + "." if section else "") + str(min(keys, key=str))
    message = str(err.value)
    assert message.startswith(f"params: unknown key {first}; known keys here: ") and "\n" not in message


def test_yaml_with_number_and_name_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("1: a\nfoo: b\n")
    with pytest.raises(PipelineError, match=r"^params: unknown key 1; known keys here: augment, batch_size, "):
        params_lib.load(path)


def test_schedule_keep_and_skipping_phase_1():
    p = params_lib.from_dict({"train_head": {"epochs": 0}, "fine_tune": {"schedule": "cosine", "warmup_epochs": 2,
                                                                         "keep": "val_loss"}})
    assert p.train_head.epochs == 0 and p.fine_tune.schedule == "cosine" and p.fine_tune.keep == "val_loss"
    with pytest.raises(PipelineError, match="fine_tune.epochs is 0"):
        params_lib.from_dict({"fine_tune": {"epochs": 0}})
    with pytest.raises(PipelineError, match=r"fine_tune.warmup_epochs is 10; it must be less than fine_tune.epochs \(10\)"):
        params_lib.from_dict({"fine_tune": {"schedule": "cosine", "warmup_epochs": 10}})
    with pytest.raises(PipelineError, match="train_head.keep"):
        params_lib.from_dict({"train_head": {"keep": "best"}})


def test_prevalence_is_a_share_or_validation():
    assert params_lib.Params().evaluate.prevalence == 0.5  # even odds, not validation's collected 74%
    for value in (0.05, 0.5, 0.999, "validation"):
        assert params_lib.from_dict({"evaluate": {"prevalence": value}}).evaluate.prevalence == value
    with pytest.raises(PipelineError, match=r"^params: evaluate.prevalence is 'train'; it must be a share of pneumonia "
                                            r"in \(0, 1\), or validation"):
        params_lib.from_dict({"evaluate": {"prevalence": "train"}})


def _documented_switches():
    """(dotted key, value as a user types it after -S, the value the schema must read) for every choice param
    (each Literal's every choice) and every boolean."""
    import dataclasses
    import typing

    from pneumonia import params as params_lib

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, key = hints[f.name], prefix + f.name
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, key + ".")
            elif typing.get_origin(hint) is typing.Literal:
                for choice in typing.get_args(hint):
                    yield key, str(choice), choice
            elif hint is bool:
                yield from ((key, "true", True), (key, "false", False))

    return list(walk(params_lib.Params))


def test_every_documented_switch_reads_as_typed_after_dvc_writes_it(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml through DVC's own override code (YAML 1.2, so `off` and
    `on` stay plain words); the loader must read each back as the user typed it (YAML 1.1 made them booleans)."""
    import shutil

    from dvc.utils.hydra import apply_overrides

    from pneumonia import params as params_lib

    switches = _documented_switches()
    assert ("compute.mixed_precision", "off", "off") in switches and ("augment.enabled", "true", True) in switches
    for key, typed, expected in switches:
        path = tmp_path / "params.yaml"
        shutil.copy(ROOT / "params.yaml", path)
        apply_overrides(path, [f"{key}={typed}"])  # what `dvc exp run -S` calls
        value = params_lib.load(path)
        for part in key.split("."):
            value = getattr(value, part)
        assert value == expected, (key, typed, path.read_text())
