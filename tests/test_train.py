import functools
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from pneumonia import codedeps, train
from pneumonia.errors import PipelineError
from pneumonia.params import ComputeParams


class StopAfterEpoch(keras.callbacks.Callback):
    """Raise what SIGTERM becomes in a stage once `epoch` epochs have finished (after the checkpoint callback)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt


def _head():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dropout(0.3)(keras.layers.Dense(16, activation="relu", name="hidden")(inputs))  # dropout: an RNG to resume
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))


def _data(seed, n=64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x[:, 0] + rng.normal(scale=0.8, size=n) > 0).astype("int32")


def _curves(live_dir):
    """metric name -> [(step, value)] from DVCLive's .tsv files (their timestamps differ between runs)."""
    curves = {}
    for tsv in sorted(Path(live_dir, "plots", "metrics").rglob("*.tsv")):
        header, *rows = [line.split("\t") for line in tsv.read_text().splitlines()]
        step = header.index("step")  # the value is the last column; a timestamp column may come first
        curves[tsv.relative_to(live_dir).as_posix()] = [(int(r[step]), float(r[-1])) for r in rows]
    return curves


def _train(tmp_path, name, stop_after=None, **options):
    """A fresh process's view: seeded, new model; train.fit with checkpoints every epoch, maybe killed."""
    keras.backend.clear_session()  # layer names (and so variable paths) restart as in a new process
    keras.utils.set_random_seed(0)
    runtime = train.configure(0, ComputeParams())
    model = _head()
    extra = [StopAfterEpoch(stop_after)] if stop_after else []
    original_fit = keras.Model.fit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.Model, "fit", lambda self, *a, **kw: original_fit(
            self, *a, **{**kw, "callbacks": [*kw["callbacks"], *extra]}))
        summary = train.fit(model, _data(0), _data(1, 48), lr=0.05, epochs=12, patience=2, batch_size=16,
                            runtime=runtime, live_dir=tmp_path / name, backup_dir=tmp_path / "resume" / name, **options)
    return model, summary


@pytest.mark.slow  # over 10 s: make test only
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """Killed after epoch k, then rerun: the same weights, summary, curves and DVCLive summary."""
    monkeypatch.setenv("PNEUMONIA_CHECKPOINT_EVERY_S", "0")
    reference, summary = _train(tmp_path, "uninterrupted")
    steps = len(_curves(tmp_path / "uninterrupted")["plots/metrics/eval/auc.tsv"])
    # Early stopping restored an earlier epoch, so its state (best score, weights, wait count) matters on resume.
    assert (summary["best_epoch"], steps) == (6, 8)  # the run these kill points are chosen for
    # After epoch 2: early in training. After 6: the best epoch just passed. After 7: one epoch without
    # improvement is counted, and the run stops after the next one and restores epoch 6.
    for k in (2, 6, 7):
        name = f"killed-after-{k}"
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path, name, stop_after=k)
        assert (tmp_path / "resume" / name / f"epoch-{k}" / "state.json").exists()
        with np.load(tmp_path / "resume" / name / f"epoch-{k}" / "variables.npz") as saved:  # by path, not index
            assert {"model/hidden/kernel", "optimizer/adam/iteration"} <= set(saved.files)
        capsys.readouterr()
        model, resumed = _train(tmp_path, name)
        assert f"resuming an interrupted run after epoch {k}" in capsys.readouterr().out
        assert not (tmp_path / "resume" / name).exists()  # deleted on success
        assert resumed == summary
        for a, b in zip(model.get_weights(), reference.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert _curves(tmp_path / name) == _curves(tmp_path / "uninterrupted")
        assert (tmp_path / name / "metrics.json").read_text() == (tmp_path / "uninterrupted" / "metrics.json").read_text()


@pytest.mark.slow  # over 10 s: make test only
def test_a_resumed_cosine_schedule_continues_the_same_curve(tmp_path, monkeypatch):
    """The schedule counts optimizer steps, which the checkpoint restores: killed mid-warmup and mid-decay."""
    monkeypatch.setenv("PNEUMONIA_CHECKPOINT_EVERY_S", "0")
    options = dict(schedule="cosine", warmup_epochs=2, keep="last")
    reference, summary = _train(tmp_path, "uninterrupted", **options)
    assert summary["best_epoch"] == 12  # keep last: every epoch runs, the last is kept
    for k in (1, 7):
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path, f"killed-{k}", stop_after=k, **options)
        model, resumed = _train(tmp_path, f"killed-{k}", **options)
        assert resumed == summary
        for a, b in zip(model.get_weights(), reference.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert _curves(tmp_path / f"killed-{k}") == _curves(tmp_path / "uninterrupted")


@pytest.mark.slow  # over 10 s: make test only
def test_weight_averaging_keeps_the_validated_average_and_resumes_exactly(tmp_path, monkeypatch):
    """With ema the kept weights are the moving average that was validated (not the raw weights), early stopping
    included, and a run killed after a checkpoint (written with the average swapped in) resumes to the same."""
    monkeypatch.setenv("PNEUMONIA_CHECKPOINT_EVERY_S", "0")
    raw, raw_summary = _train(tmp_path, "raw")
    model, summary = _train(tmp_path, "ema", ema=0.9)
    assert summary != raw_summary  # the average is what was validated and kept
    kept = json.loads((tmp_path / "ema" / "metrics.json").read_text())["eval"]
    val_x, val_y = _data(1, 48)
    logs = model.evaluate(val_x, val_y, batch_size=16, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(kept["loss"], rel=1e-5) and logs["auc"] == pytest.approx(kept["auc"], rel=1e-5)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "ema-killed", stop_after=summary["best_epoch"] + 1, ema=0.9)
    resumed_model, resumed = _train(tmp_path, "ema-killed", ema=0.9)
    assert resumed == summary
    for a, b in zip(resumed_model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert _curves(tmp_path / "ema-killed") == _curves(tmp_path / "ema")


@pytest.mark.slow  # over 10 s: make test only
def test_mixup_trains_on_mixed_batches_validates_on_plain_ones_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_CHECKPOINT_EVERY_S", "0")
    _train(tmp_path, "plain")
    model, summary = _train(tmp_path, "mixup", mixup=0.4)
    assert _curves(tmp_path / "mixup")["plots/metrics/train/loss.tsv"] != _curves(tmp_path / "plain")["plots/metrics/train/loss.tsv"]
    kept = json.loads((tmp_path / "mixup" / "metrics.json").read_text())["eval"]
    val_x, val_y = _data(1, 48)
    logs = model.evaluate(val_x, val_y, batch_size=16, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(kept["loss"], rel=1e-5)  # validation is never mixed
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "mixup-killed", stop_after=2, mixup=0.4)
    resumed_model, resumed = _train(tmp_path, "mixup-killed", mixup=0.4)
    assert resumed == summary
    for a, b in zip(resumed_model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert _curves(tmp_path / "mixup-killed") == _curves(tmp_path / "mixup")


def test_label_smoothing_is_the_loss_that_is_validated_and_kept(tmp_path):
    """The kept epoch's validation loss is the BCE towards 1 - s/2 and s/2 of what the kept weights predict."""
    s = 0.2
    model, summary = _train(tmp_path, "smoothed", label_smoothing=s)
    kept = json.loads((tmp_path / "smoothed" / "metrics.json").read_text())["eval"]
    val_x, val_y = _data(1, 48)
    p = np.clip(model.predict(val_x, verbose=0)[:, 0].astype("float64"), 1e-7, 1 - 1e-7)
    target = val_y * (1 - s) + s / 2
    smoothed = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
    hard = -np.mean(val_y * np.log(p) + (1 - val_y) * np.log(1 - p))
    assert kept["loss"] == pytest.approx(smoothed, rel=1e-4)
    assert abs(hard - smoothed) > 1e-3  # so the check above tells the two apart


def test_learning_rate_schedules():
    assert train.learning_rate(1e-3, "constant", 0, 10, 5) == 1e-3
    cosine = train.learning_rate(1e-3, "cosine", 0, 10, 5)
    assert float(cosine(0)) == pytest.approx(1e-3) and float(cosine(25)) == pytest.approx(5e-4)
    assert float(cosine(50)) == pytest.approx(0.0, abs=1e-12)
    warm = train.learning_rate(1e-3, "cosine", 2, 10, 5)  # 10 warmup steps, then 40 of decay
    rates = [float(warm(step)) for step in range(51)]
    assert rates[0] == 0.0 and rates[5] == pytest.approx(5e-4) and rates[10] == pytest.approx(1e-3)
    assert rates[30] == pytest.approx(5e-4) and rates[50] == pytest.approx(0.0, abs=1e-12)
    assert max(rates) == pytest.approx(1e-3) and rates.index(max(rates)) == 10


class RecordWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.per_epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.per_epoch.append(self.model.get_weights())


@pytest.mark.parametrize("keep", ["val_auc", "val_loss", "last"])
def test_the_kept_epoch_is_chosen_by_the_param_and_its_weights_are_the_model(tmp_path, keep):
    keras.utils.set_random_seed(0)
    runtime = train.configure(0, ComputeParams())
    model, recorder = _head(), RecordWeights()
    original_fit = keras.Model.fit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.Model, "fit", lambda self, *a, **kw: original_fit(
            self, *a, **{**kw, "callbacks": [*kw["callbacks"], recorder]}))
        summary = train.fit(model, _data(0), _data(1, 48), lr=0.05, epochs=12, patience=2, batch_size=16,
                            runtime=runtime, live_dir=tmp_path / keep, keep=keep)
    curves = _curves(tmp_path / keep)
    auc = [v for _, v in curves["plots/metrics/eval/auc.tsv"]]
    loss = [v for _, v in curves["plots/metrics/eval/loss.tsv"]]
    expected = {"val_auc": int(np.argmax(auc)), "val_loss": int(np.argmin(loss)), "last": len(auc) - 1}[keep]
    assert summary["best_epoch"] == expected + 1 and summary["best_val_auc"] == round(auc[expected], 4)
    if keep == "last":
        assert len(auc) == 12  # no early stopping
    for a, b in zip(model.get_weights(), recorder.per_epoch[expected]):
        np.testing.assert_array_equal(a, b)
    logged = json.loads((tmp_path / keep / "metrics.json").read_text())
    assert logged["eval"]["loss"] == loss[expected]


def test_zero_head_epochs_skip_phase_1(tmp_path):
    from pneumonia import model as model_lib

    runtime = train.configure(0, ComputeParams())
    net = model_lib.build(32, "none", dropout=0.0)
    before = [w.copy() for w in net.get_weights()]
    x = np.zeros((4, 32, 32, 1), "uint8")
    summary = train.train_head(net, (x, np.array([0, 1, 0, 1])), (x, np.array([0, 1, 0, 1])), lr=1e-3, epochs=0,
                               patience=1, batch_size=2, runtime=runtime, live_dir=tmp_path / "live")
    assert summary == {"best_epoch": 0, "best_val_auc": None}
    assert all(np.array_equal(a, b) for a, b in zip(net.get_weights(), before))
    assert json.loads((tmp_path / "live" / "metrics.json").read_text()) == {"best_epoch": 0, "skipped": True}


def test_summary_holds_the_kept_epoch_and_the_curves_every_epoch(tmp_path):
    """`dvc exp show` reads DVCLive's summary: it must be the restored (best) epoch's values, not the last one's."""
    _, summary = _train(tmp_path, "run")
    curves = _curves(tmp_path / "run")
    best = summary["best_epoch"] - 1
    assert len(curves["plots/metrics/eval/auc.tsv"]) > summary["best_epoch"]  # later epochs were logged too
    logged = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for split in ("train", "eval"):
        for metric in ("loss", "auc", "accuracy"):
            assert logged[split][metric] == curves[f"plots/metrics/{split}/{metric}.tsv"][best][1]
    assert logged["eval"]["auc"] == max(v for _, v in curves["plots/metrics/eval/auc.tsv"])
    assert logged["eval"]["loss"] != curves["plots/metrics/eval/loss.tsv"][-1][1]


def test_resume_dir_changes_with_code_params_inputs_and_runtime_and_drops_orphans(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.npz"
    data.write_bytes(b"x")
    runtime = train.Runtime(gpus=0, mixed_precision=False, jit_compile=False, strategy=None)
    key = train.resume_dir("train_head", {"lr": 1e-4}, data, runtime=runtime)
    # A GPU run's checkpoint (mixed precision adds loss-scale variables, XLA changes the numerics) is not this one's.
    for other in (dict(mixed_precision=True), dict(jit_compile=True)):
        assert train.resume_dir("train_head", {"lr": 1e-4}, data,
                                runtime=train.Runtime(**{**runtime.__dict__, **other})) != key
    monkeypatch.setattr(train, "resume_dir", functools.partial(train.resume_dir, runtime=runtime))
    a = train.resume_dir("train_head", {"lr": 1e-4}, data)
    a.mkdir(parents=True)
    assert a == train.resume_dir("train_head", {"lr": 1e-4}, data) and a.exists()
    b = train.resume_dir("train_head", {"lr": 3e-4}, data)
    assert b != a and not a.exists()  # the orphan of the old params is gone
    other_stage = train.resume_dir("fine_tune", {"lr": 1e-4}, data)
    other_stage.mkdir(parents=True)
    data.write_bytes(b"xy")
    assert train.resume_dir("train_head", {"lr": 3e-4}, data) != b
    assert other_stage.exists()  # another stage's checkpoint is not this stage's orphan
    # The code: a checkpoint made by other code is never loaded.
    copy = tmp_path / "copy"
    for name in codedeps.stage_code("train_head"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((codedeps.ROOT / name).read_bytes())
    monkeypatch.setattr(codedeps, "ROOT", copy)
    before = train.resume_dir("train_head", {"lr": 3e-4}, data)
    (copy / "pneumonia" / "train.py").write_bytes((copy / "pneumonia" / "train.py").read_bytes() + b"\n# an edit\n")
    assert train.resume_dir("train_head", {"lr": 3e-4}, data) != before


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
    assert runtime.mixed_precision  # auto: on with GPUs
    assert runtime.strategy == ("mirrored" if backend == "tensorflow" else None)
    # XLA across MirroredStrategy's replicas fails, so auto leaves it off there (as Keras's auto does), and on is refused.
    assert runtime.jit_compile == (backend == "jax")
    single = train.configure(0, ComputeParams(distribute="none"))
    assert single.strategy is None and single.jit_compile
    if backend == "tensorflow":
        with pytest.raises(PipelineError, match="jit_compile=on does not work with MirroredStrategy"):
            train.configure(0, ComputeParams(jit_compile="on"))
    if backend == "jax":
        with pytest.raises(PipelineError, match="needs the TensorFlow backend"):
            train.configure(0, ComputeParams(distribute="mirrored"))
        monkeypatch.setattr(train, "_visible_gpus", lambda: 0)
        assert train.configure(0, ComputeParams()).jit_compile  # JAX compiles even on CPU


def test_live_metrics_uses_dvclive_keras_names(tmp_path):
    from dvclive import Live

    with Live(dir=str(tmp_path), dvcyaml=False, save_dvc_exp=False) as live:
        history = []
        train.LiveMetrics(live, history).on_epoch_end(0, {"loss": 0.5, "auc": 0.75, "val_loss": 0.25, "val_auc": 1.0})
    assert history == [{"loss": 0.5, "auc": 0.75, "val_loss": 0.25, "val_auc": 1.0}]
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


def test_a_checkpoint_of_other_variables_is_discarded_and_training_starts_afresh(tmp_path, monkeypatch, capsys):
    """Another runtime's checkpoint (here: another model's variables) never lands in the wrong variables, and a
    rerun is not stuck on it: it is deleted with one line and the run starts from epoch 0."""
    monkeypatch.setenv("PNEUMONIA_CHECKPOINT_EVERY_S", "0")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "run", stop_after=2)
    checkpoint = tmp_path / "resume" / "run"
    assert (checkpoint / "epoch-2").exists()
    monkeypatch.setattr(sys.modules[__name__], "_head", lambda: keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, name="other"), keras.layers.Dense(1, activation="sigmoid")]))
    capsys.readouterr()
    _, summary = _train(tmp_path, "run")
    out = capsys.readouterr().out
    assert "discarding the checkpoint" in out and "training starts afresh" in out
    assert "resuming" not in out and not checkpoint.exists() and summary["best_epoch"] >= 1


def test_drop_remainder_makes_every_training_batch_full():
    x, y = np.arange(70, dtype="float32")[:, None], (np.arange(70) % 2).astype("int32")
    batches = train.Batches(x, y, 16, seed=1, drop_remainder=True)
    left_out = []
    for _ in range(2):
        batches.on_epoch_begin()
        assert len(batches) == 4 and {len(batches[i][1]) for i in range(4)} == {16}
        left_out.append(set(range(70)) - {int(v) for i in range(4) for v in batches[i][0][:, 0]})
    assert len(left_out[0]) == 6 and left_out[0] != left_out[1]  # a new order each epoch leaves out others
    assert len(train.Batches(x[:10], y[:10], 16, drop_remainder=True)) == 1  # fewer images than a batch: one batch


def test_configure_warns_in_one_line_when_nvidia_smi_lists_gpus_the_backend_cannot_see(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "nvidia-smi"  # a machine whose driver works but whose CUDA libraries do not load
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    train.configure(0, ComputeParams())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nvidia-smi lists 1 GPU(s) but tensorflow sees none" in err[0]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi: nothing said
    train.configure(0, ComputeParams())
    assert capsys.readouterr().err == ""


# The oneDNN DT_HALF notice configure() keeps off the output: tests/test_backends.py, on the mixed-precision runs.
