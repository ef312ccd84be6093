import json

import keras
import numpy as np
import pytest

from pneumonia import train
from pneumonia.errors import PipelineError
from pneumonia.params import ComputeParams


class StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt  # what SIGTERM becomes in a stage


def _head():
    inputs = keras.Input((8,))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))


def _data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def test_interrupted_training_resumes_from_last_epoch_then_cleans_up(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "CHECKPOINT_EVERY_S", 0.0)  # these epochs take milliseconds
    runtime = train.configure(0, ComputeParams())
    backup = tmp_path / "resume"
    args = dict(lr=1e-2, epochs=3, patience=3, batch_size=16, runtime=runtime, live_dir=tmp_path / "live", backup_dir=backup)

    model = _head()
    original_fit = keras.Model.fit
    monkeypatch.setattr(keras.Model, "fit", lambda self, *a, **kw: original_fit(
        self, *a, **{**kw, "callbacks": [*kw["callbacks"], StopAfterFirstEpoch()]}))
    with pytest.raises(KeyboardInterrupt):
        train.fit(model, _data(0), _data(1), **args)
    assert (backup / "training_metadata.json").exists()
    monkeypatch.setattr(keras.Model, "fit", original_fit)

    summary = train.fit(_head(), _data(0), _data(1), **args)
    assert "resuming an interrupted run after epoch 1" in capsys.readouterr().out
    assert not backup.exists()  # deleted on success
    assert summary["best_epoch"] >= 1


def test_resume_dir_changes_with_params_and_inputs(tmp_path):
    from pneumonia.params import Params, from_dict

    data = tmp_path / "d.npz"
    data.write_bytes(b"x")
    a = train.resume_dir("train_head", Params(), data)
    assert a == train.resume_dir("train_head", Params(), data)
    assert a != train.resume_dir("train_head", from_dict({"lr": 3e-4}), data)
    data.write_bytes(b"xy")
    assert a != train.resume_dir("train_head", Params(), data)


def test_resource_check_refuses_a_cache_that_cannot_fit():
    with pytest.raises(PipelineError, match="activation cache needs .* GiB"):
        train.check_resources(10**7, (14, 14, 1024), "float16", "fine_tune")
    train.check_resources(100, (7, 7, 2048), "float16", "fine_tune")  # small: no error


def test_class_weights_balance_the_classes():
    weights = train.class_weights(np.array([0] * 25 + [1] * 75))
    assert weights[0] * 25 == pytest.approx(weights[1] * 75)


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_configure_picks_distribution_and_xla_per_backend(monkeypatch, backend):
    """Two GPUs, as configure() sees them: auto mirrors only on TensorFlow; auto XLA is on for JAX."""
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    monkeypatch.setattr(train, "_visible_gpus", lambda: 2)
    monkeypatch.setattr(keras.mixed_precision, "set_global_policy", lambda policy: None)  # leave this process's policy
    if backend == "tensorflow":
        import tensorflow as tf

        monkeypatch.setattr(tf.distribute, "MirroredStrategy", lambda: "mirrored")
    runtime = train.configure(0, ComputeParams())
    assert runtime.jit_compile and runtime.mixed_precision  # auto: on with GPUs
    assert runtime.strategy == ("mirrored" if backend == "tensorflow" else None)
    assert train.configure(0, ComputeParams(distribute="none")).strategy is None
    if backend == "jax":
        with pytest.raises(PipelineError, match="needs the TensorFlow backend"):
            train.configure(0, ComputeParams(distribute="mirrored"))
        monkeypatch.setattr(train, "_visible_gpus", lambda: 0)
        assert train.configure(0, ComputeParams()).jit_compile  # JAX compiles even on CPU


def test_live_metrics_uses_dvclive_keras_names(tmp_path):
    from dvclive import Live

    with Live(dir=str(tmp_path), dvcyaml=False, save_dvc_exp=False) as live:
        train.LiveMetrics(live).on_epoch_end(0, {"loss": 0.5, "auc": 0.75, "val_loss": 0.25, "val_auc": 1.0})
    logged = json.loads((tmp_path / "metrics.json").read_text())
    assert logged["train"] == {"loss": 0.5, "auc": 0.75} and logged["eval"] == {"loss": 0.25, "auc": 1.0}

def test_fit_trains_like_plain_fit_on_the_same_batches(tmp_path):
    """One epoch of train.fit == plain fit over the batches train.Batches drew, with the same class weights."""
    runtime = train.configure(0, ComputeParams())
    x, _ = _data(0)
    y = (x[:, 0] > -0.6).astype("int32")  # about 3:1, so the class weights matter
    val = _data(1)

    keras.utils.set_random_seed(3)
    project = _head()
    train.fit(project, (x, y), val, lr=1e-2, epochs=1, patience=1, batch_size=16, runtime=runtime,
              live_dir=tmp_path / "live")

    keras.utils.set_random_seed(3)
    plain = _head()
    batches = train.Batches(x, y, 16, seed=int(np.random.randint(2**31)))  # the draw train.fit makes
    batches.on_epoch_begin()
    xs = np.concatenate([batches[i][0] for i in range(len(batches))])
    ys = np.concatenate([batches[i][1] for i in range(len(batches))])
    plain.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.BinaryCrossentropy())
    plain.fit(xs, ys, epochs=1, batch_size=16, shuffle=False, class_weight=train.class_weights(y), verbose=0)

    for a, b in zip(project.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_batches_are_reshuffled_every_epoch_reproducibly():
    # fit's own route for arrays replays the first epoch's order every epoch under a global seed; Batches must not.
    x = np.arange(70, dtype="float32")[:, None]
    y = (np.arange(70) % 2).astype("int32")

    def orders(seed):
        batches, seen = train.Batches(x, y, 16, seed=seed), []
        for _ in range(3):
            batches.on_epoch_begin()
            assert len(batches) == 5  # 4 full batches and one of 6
            epoch = np.concatenate([batches[i][0][:, 0] for i in range(len(batches))]).astype(int)
            np.testing.assert_array_equal(np.sort(epoch), np.arange(70))  # every image exactly once
            seen.append(epoch.tolist())
        return seen

    first = orders(5)
    assert first[0] != first[1] != first[2]
    assert orders(5) == first  # the same seed, the same orders
    validation = train.Batches(x, y, 16)
    np.testing.assert_array_equal(np.concatenate([validation[i][0] for i in range(5)])[:, 0], x[:, 0])  # in order


def test_batches_copy_one_batch_not_the_arrays():
    x = np.zeros((64, 4, 4, 8), dtype="float16")
    batch = train.Batches(x, np.zeros(64, "int32"), 16, seed=0)[0][0]
    assert batch.shape == (16, 4, 4, 8) and batch.dtype == np.float16 and not np.shares_memory(batch, x)
