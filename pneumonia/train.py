"""The two training phases on cached activations.

The frozen prefix of the network runs once per image for the whole stage (once per image and augmented view,
pneumonia.augment); only the trainable suffix runs each epoch. With BatchNorm in inference mode this is the same
maths as `fit` on the full model over the same (augmented) images.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from dvclive import Live

from pneumonia import augment as augment_lib
from pneumonia import quiet_float16_notice
from pneumonia import codedeps, devicestats
from pneumonia import model as model_lib
from pneumonia.errors import PipelineError
from pneumonia.files import atomic_path
from pneumonia.progress import progress

CACHE_CHUNK = 32  # images per prefix forward call: small chunks run as fast per image and touch far less fresh memory
RESUME_ROOT = Path(".cache/resume")  # checkpoints of an unfinished stage; not a DVC output
DEFAULT_CHECKPOINT_EVERY_S = 30.0  # a crash loses at most this much training; sub-second epochs do not each pay a write


@dataclass(frozen=True)
class Runtime:
    gpus: int
    mixed_precision: bool
    jit_compile: bool  # requested; fit prints what Keras really compiled
    strategy: object | None  # a tf.distribute strategy, or None

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync if self.strategy is not None else 1

    def key(self) -> dict:
        """What a checkpoint depends on beyond params, code and data: its variables and their numerics."""
        return {"backend": keras.backend.backend(), "mixed_precision": self.mixed_precision,
                "jit_compile": self.jit_compile, "replicas": self.replicas}

    def describe(self) -> str:
        dist = type(self.strategy).__name__ if self.strategy is not None else "none"
        return (f"backend {keras.backend.backend()}, GPUs {self.gpus}, mixed precision {self.mixed_precision}, "
                f"XLA {self.jit_compile}, distribution {dist}")


def _visible_gpus() -> int:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(d.platform == "gpu" for d in jax.devices())
    return 0


def _gpus_listed_by_nvidia_smi() -> int:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def configure(seed: int, compute) -> Runtime:
    """Seeds, determinism and the GPU-only switches, all decided here and only here."""
    keras.utils.set_random_seed(seed)  # Python, NumPy and the backend
    backend = keras.backend.backend()
    gpus = _visible_gpus()
    listed = _gpus_listed_by_nvidia_smi() if gpus == 0 else 0
    if listed:  # a broken CUDA install: the backend's own message is among the start-up chatter hidden on import
        print(f"warning: nvidia-smi lists {listed} GPU(s) but {backend} sees none, so this trains on the CPU; "
              "check the CUDA libraries (PNEUMONIA_TF_LOGS=1 shows TensorFlow's start-up messages)",
              file=sys.stderr, flush=True)
    mixed = compute.mixed_precision == "on" or (compute.mixed_precision == "auto" and gpus > 0)
    # MirroredStrategy is TensorFlow's: auto uses it only there, other backends train on one device.
    mirrored = compute.distribute == "mirrored" or (compute.distribute == "auto" and gpus > 1
                                                    and backend == "tensorflow")
    if mirrored and backend != "tensorflow":
        raise PipelineError("params: compute.distribute=mirrored needs the TensorFlow backend; set it to none")
    # XLA under tf.distribute fails across replicas ("Trying to access resource ... replica_1"), which is why
    # Keras's own auto leaves it off there; auto does the same here, and an explicit `on` is refused.
    if mirrored and compute.jit_compile == "on":
        raise PipelineError("params: compute.jit_compile=on does not work with MirroredStrategy; set "
                            "compute.jit_compile=auto (off under MirroredStrategy) or compute.distribute=none")
    # JAX without jit runs op by op, so auto means on there (as Keras's own default does).
    jit = compute.jit_compile == "on" or (compute.jit_compile == "auto" and not mirrored
                                          and (gpus > 0 or backend == "jax"))
    if backend == "tensorflow":
        from tensorflow.python.framework import config as tf_config

        # Keras silently drops XLA when op determinism is on, so it is one or the other:
        # bit-identical reruns without XLA (the CPU default), XLA speed with it (the GPU default).
        tf_config.disable_op_determinism() if jit else tf_config.enable_op_determinism()
        quiet_float16_notice()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    strategy = None
    if mirrored:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
    return Runtime(gpus, mixed, jit, strategy)


def chunk_size(n_images: int) -> int:
    """The one batch size the prefix runs at: as even a split of n_images into CACHE_CHUNK-sized pieces as can be.

    Every call then has the same shape (the last chunk padded by at most a few blank images), so the prefix is traced
    and optimised once; a second shape costs a retrace of the whole network, over a second of ResNet-50 on CPU.
    """
    chunks = -(-n_images // CACHE_CHUNK)
    return -(-n_images // chunks)


def cache_activations(prefix: keras.Model | None, images: np.ndarray, dtype: str, label: str,
                      view=None) -> np.ndarray:
    """Run the frozen prefix once over `images`, chunk by chunk, into one compact array.

    With `view` = (augmentation layers, seed, view index), over that augmented view of the images
    (pneumonia.augment.view, drawn chunk by chunk here so the whole view is never held in memory).
    """
    if prefix is None:  # nothing frozen before the cut: the raw uint8 pixels are the cache
        return images
    size, out = chunk_size(len(images)), None
    with progress(len(images), f"caching {label} activations") as report:
        for index, start in enumerate(range(0, len(images), size)):
            chunk = images[start : start + size]
            if view is not None:
                chunk = augment_lib.transform(view[0], chunk, view[1], view[2], index)
            n = len(chunk)
            if n < size:
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
            batch = keras.ops.convert_to_numpy(prefix.predict_on_batch(chunk))[:n]
            if out is None:
                out = np.empty((len(images), *batch.shape[1:]), dtype=dtype)
            out[start : start + n] = batch
            report(start + n)
    return out


def check_resources(n_images: int, activation_shape, dtype: str, label: str, views: int = 1) -> None:
    """Refuse to start when the activation cache (all its augmented views counted) cannot fit in the memory left."""
    import psutil

    needed = n_images * int(np.prod(activation_shape)) * np.dtype(dtype).itemsize
    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        fewer = " or fewer augment.views" if views > 1 else ""
        raise PipelineError(
            f"{label}: the activation cache needs {needed / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory is free; "
            f"lower image_size, set compute.cache_dtype=float16{fewer}, or unfreeze from an earlier block"
        )


def resume_dir(stage: str, stage_params: dict, *inputs, runtime: Runtime) -> Path:
    """Checkpoint folder for this stage's code, params, input files and runtime.

    The key holds the content of the stage's own source files (pneumonia.codedeps), its params (only those it
    reads), its inputs by size and mtime and the runtime (backend, precision, XLA, replicas: Runtime.key), so a
    rerun after a crash resumes and anything changed starts afresh.
    Checkpoint folders of this stage under any other key are orphans and are deleted.
    """
    files = {}
    for path in map(Path, inputs):
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file():
                files[str(f)] = [f.stat().st_size, f.stat().st_mtime_ns]
    code = {name: hashlib.sha256((codedeps.ROOT / name).read_bytes()).hexdigest() for name in codedeps.stage_code(stage)}
    fingerprint = json.dumps({"params": stage_params, "inputs": files, "code": code, "runtime": runtime.key()},
                             sort_keys=True, default=str)
    folder = RESUME_ROOT / f"{stage}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"
    for orphan in RESUME_ROOT.glob(f"{stage}-*"):
        if orphan != folder:
            shutil.rmtree(orphan, ignore_errors=True)
    return folder


class Batches(keras.utils.PyDataset):
    """Batches gathered by index from in-memory arrays, in a new seeded order every epoch when `seed` is given.

    Epoch e's order depends only on (seed, e), so a resumed run draws the same orders as an uninterrupted one.
    `x` may be a list of K arrays (augmented views of the same images): epoch e reads view e mod K.
    With `augment` = (augmentation layers, seed), each batch is augmented here, where batches are made, from
    seeds fixed by (seed, epoch, batch): outside the compiled train step, whose XLA the augmentation layers
    would switch off (they do not support jit), and exactly the same again in a resumed run.
    With `mixup` = (alpha, seed, class weights), each batch (after augmentation) is then mixed with a permutation
    of itself (augment.mixup) and comes with sample weights that carry the class weights.
    With `drop_remainder` (training), every batch is full: an odd last batch would compile another program of
    the train step under XLA and update BatchNorm's statistics from a handful of images. Each epoch's order is
    new, so the images left out differ from epoch to epoch.

    Why not fit's own route for arrays: it turns each array into a tensor (tf.data from_tensors), which on
    TensorFlow 2.21 holds two more copies of it, so phase 2 would peak at about four times its activation cache;
    here only the batch in hand is copied. And it starts a new iterator per epoch whose shuffle restarts from the
    global seed, replaying the first epoch's order in every epoch.
    """

    def __init__(self, x, y: np.ndarray, batch_size: int, seed: int | None = None, augment=None,
                 drop_remainder: bool = False, mixup=None):
        super().__init__(workers=1, use_multiprocessing=False)
        self.views = x if isinstance(x, list) else [x]
        self.y, self.batch_size, self.seed, self.augment, self.mixup = y, batch_size, seed, augment, mixup
        self.drop_remainder = drop_remainder and len(y) >= batch_size
        self.epoch = 0  # the epoch the next on_epoch_begin starts
        self._order = np.arange(len(y))

    def __len__(self) -> int:
        return len(self.y) // self.batch_size if self.drop_remainder else -(-len(self.y) // self.batch_size)

    def __getitem__(self, index: int):
        rows = np.sort(self._order[index * self.batch_size : (index + 1) * self.batch_size])  # sorted: faster gather
        epoch = max(self.epoch - 1, 0)  # self.epoch already counts the epoch under way
        x = self.views[epoch % len(self.views)][rows]
        if self.augment is not None:
            layers, seed = self.augment
            x = augment_lib.transform(layers, x, seed, epoch, index)
        if self.mixup is not None:
            alpha, seed, class_weight = self.mixup
            return augment_lib.mixup(x, self.y[rows], class_weight, alpha, seed, epoch, index)
        return x, self.y[rows]

    def on_epoch_begin(self) -> None:  # not on_epoch_end: Keras also calls that once before training, after a peek
        if self.seed is not None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.y))
        self.epoch += 1


def _for_fit(batches: Batches):
    """What fit reads: `batches` itself, or on TensorFlow a prefetched tf.data pipeline over it, autotuning off.

    Keras runs a PyDataset either on worker threads, which take about 0.1 s to stop after every epoch, or behind
    an autotuned prefetch, whose autotuning thread delays freeing each epoch's iterator by up to seconds on a
    busy 2-core machine (`make bench`); this pays neither.
    """
    if keras.backend.backend() != "tensorflow":
        return batches
    import tensorflow as tf

    def epoch():
        batches.on_epoch_begin()
        for i in range(len(batches)):
            yield batches[i]

    signature = tuple(tf.TensorSpec((None, *a.shape[1:]), a.dtype) for a in batches[0])  # (x, y) or (x, y, weights)
    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_generator(epoch, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(len(batches))).prefetch(2).with_options(options)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    return {0: float(weights[0]), 1: float(weights[1])}


def checkpoint_interval() -> float:
    """Seconds between checkpoints (PNEUMONIA_CHECKPOINT_EVERY_S; tests set 0 to write one every epoch)."""
    return float(os.environ.get("PNEUMONIA_CHECKPOINT_EVERY_S", DEFAULT_CHECKPOINT_EVERY_S))


@dataclass
class ResumeState:
    """What an interrupted run continues from, besides the model's and optimizer's variables (restored in place):
    the epochs it finished, each one's logs (DVC deletes dvclive/ before a rerun, so the curves so far come from
    here), and the kept-epoch tracker's best score, wait count, best epoch and best weights. A fresh run's is empty."""
    epochs_done: int = 0
    history: list = field(default_factory=list)
    early: dict | None = None
    best_weights: list | None = None


class KeepBest(keras.callbacks.EarlyStopping):
    """The kept epoch: early stopping on validation AUC or loss, restoring that epoch's weights, or the last epoch.

    A resumed run's tracker starts from its ResumeState.
    """

    def __init__(self, keep: str, patience: int, epochs: int, resumed: ResumeState | None = None):
        if keep == "last":  # every epoch runs; the weights at the end are the ones kept
            super().__init__(monitor="val_auc", mode="max", patience=epochs + 1, restore_best_weights=False)
        else:
            super().__init__(monitor=keep, mode="max" if keep == "val_auc" else "min", patience=patience,
                             restore_best_weights=True)
        self.keep, self.resumed = keep, resumed

    def kept_epoch(self, epochs_run: int) -> int:
        return epochs_run - 1 if self.keep == "last" else int(self.best_epoch)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # resets the state
        if self.resumed is not None and self.resumed.early is not None:
            state, self.best_weights = self.resumed.early, self.resumed.best_weights
            self.best, self.wait, self.best_epoch = state["best"], state["wait"], state["best_epoch"]

    def state(self) -> dict:
        return {"best": None if self.best is None else float(self.best), "wait": int(self.wait),
                "best_epoch": int(self.best_epoch)}


class EMAWeights(keras.callbacks.SwapEMAWeights):
    """Keras's swap of the optimizer's moving average into the model for validation and at every epoch end, so
    KeepBest and Checkpoint see (and keep) the averaged weights; the raw ones are swapped back to train.

    A checkpoint is written at an epoch end, with the average in the model: a resumed run starts swapped.
    """

    def __init__(self, resumed: bool):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = resumed


def _latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(Path(folder).glob("epoch-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def restore_checkpoint(folder: Path, model: keras.Model, runtime: Runtime) -> ResumeState:
    """Load the latest checkpoint in `folder`: its variables into `model` and its optimizer (matched by path), the
    rest returned. No checkpoint: an empty state.

    A checkpoint whose variables do not match the model's by path and shape (another runtime: mixed precision's
    loss scaling adds optimizer variables) or cannot be read is deleted, and training starts afresh.
    """
    latest = _latest_checkpoint(folder)
    if latest is None:
        return ResumeState()
    with runtime.scope():  # optimizer variables made under a strategy must be made in its scope
        model.optimizer.build(model.trainable_variables)
    named = _named_variables(model)
    try:
        state = json.loads((latest / "state.json").read_text())
        with np.load(latest / "variables.npz") as saved:
            stored = {k for k in saved.files if not k.startswith("best/")}
            if stored != set(named) or any(saved[k].shape != tuple(v.shape) for k, v in named.items()):
                raise ValueError("its variables are not this model's")
            with runtime.scope():
                for key, variable in named.items():
                    variable.assign(saved[key])
            best = [saved[f"best/{i}"] for i in range(state["best_weights"])] if state["best_weights"] else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        print(f"  discarding the checkpoint {latest} ({exc}); training starts afresh", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        return ResumeState()
    return ResumeState(state["epoch"], state["history"], state["early"], best)


class Checkpoint(keras.callbacks.Callback):
    """Everything the next epoch depends on, written at an epoch end at most every checkpoint_interval() seconds.

    A checkpoint holds every model variable (weights, BatchNorm statistics and dropout's random-generator state,
    which `save_weights` leaves out) and the optimizer's, by path, and the rest of a ResumeState: the tracker's
    state and best weights, and every finished epoch's logs (`history`, which LiveMetrics fills). Each one is
    written to a temporary folder and renamed, so a kill mid-write leaves the previous one; restore_checkpoint
    reads it back.
    """

    def __init__(self, folder: Path, early: KeepBest, history: list):
        super().__init__()
        self.folder, self.early, self.history = Path(folder), early, history
        self._last_write = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.params["epochs"] or self.model.stop_training  # training ends here anyway
        if last or time.monotonic() - self._last_write < checkpoint_interval():
            return
        arrays = {key: keras.ops.convert_to_numpy(v) for key, v in _named_variables(self.model).items()}
        best = self.early.best_weights or []
        arrays |= {f"best/{i}": w for i, w in enumerate(best)}
        state = {"epoch": epoch + 1, "early": self.early.state(), "best_weights": len(best), "history": self.history}
        tmp = self.folder / f".epoch-{epoch + 1}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.savez(tmp / "variables.npz", **arrays)
        (tmp / "state.json").write_text(json.dumps(state))
        os.replace(tmp, self.folder / f"epoch-{epoch + 1}")
        for older in self.folder.glob("epoch-*[0-9]"):
            if older.name != f"epoch-{epoch + 1}":
                shutil.rmtree(older, ignore_errors=True)
        print(f"  checkpoint after epoch {epoch + 1}", flush=True)
        self._last_write = time.monotonic()


def _named_variables(model: keras.Model) -> dict:
    """Every variable of the model and its optimizer by path (model/conv1_conv/kernel, optimizer/adam/iteration)."""
    named = {}
    for prefix, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
        for variable in variables:
            key, n = f"{prefix}/{variable.path}", 1
            while key in named:  # paths are unique in practice; numbered in order if not
                key, n = f"{prefix}/{variable.path}#{n}", n + 1
            named[key] = variable
    return named


class LiveMetrics(keras.callbacks.Callback):
    """Each epoch's metrics to DVCLive under the names dvclive.keras.DVCLiveCallback uses (train/loss, eval/auc, ...).

    DVCLiveCallback subclasses tf.keras.callbacks.Callback, which imports TensorFlow on every backend;
    this one is plain Keras 3, so training under KERAS_BACKEND=jax does not need TensorFlow. Every epoch's
    logs are also kept in `history` (for checkpoints and the summary).
    """

    def __init__(self, live, history: list):
        super().__init__()
        self.live, self.history = live, history

    def log(self, logs: dict) -> None:
        from dvclive.utils import standardize_metric_name

        for name, value in logs.items():
            self.live.log_metric(standardize_metric_name(name, "dvclive.keras"), value)
        self.live.next_step()

    def on_epoch_end(self, epoch, logs=None):
        logs = {name: float(value) for name, value in (logs or {}).items()}
        self.history.append(logs)
        self.log(logs)


class Throughput(keras.callbacks.Callback):
    """Seconds of training steps and of the validation pass, per epoch, measured apart (for make gpu-check)."""

    def __init__(self):
        super().__init__()
        self.train_s, self.val_s = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._val_start = time.perf_counter()
        self.train_s.append(self._val_start - self._start)

    def on_test_end(self, logs=None):
        self.val_s.append(time.perf_counter() - self._val_start)

    def entry(self, phase: str, images: int, batch_size: int) -> dict:
        """The phase's record; the steady state leaves out the first epoch, which includes tracing and compiling."""
        steady = self.train_s[1:] or self.train_s
        return {"phase": phase, "train_images": images, "batch_size": batch_size, "epochs": len(self.train_s),
                "train_s_per_epoch": [round(t, 3) for t in self.train_s],
                "val_s_per_epoch": [round(t, 3) for t in self.val_s],
                "train_images_per_s": round(images * len(steady) / sum(steady), 1) if sum(steady) else None}


def learning_rate(lr: float, schedule: str, warmup_epochs: int, epochs: int, steps_per_epoch: int):
    """A constant rate, or Keras's cosine decay to 0 over the epochs after an optional linear warmup from 0.

    Schedules count optimizer steps, which a checkpoint restores, so a resumed run continues the same curve.
    """
    if schedule == "constant":
        return lr
    decay_steps = max(1, (epochs - warmup_epochs) * steps_per_epoch)
    if warmup_epochs == 0:
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps, warmup_target=lr,
                                                  warmup_steps=warmup_epochs * steps_per_epoch)


def fit(trainable: keras.Model, train, val, *, lr, epochs, patience, batch_size, runtime: Runtime, live_dir,
        backup_dir: Path | None = None, schedule: str = "constant", warmup_epochs: int = 0,
        keep: str = "val_auc", ema: float = 0.0, label_smoothing: float = 0.0, mixup: float = 0.0,
        augment=None) -> dict:
    """Train `trainable` on (inputs, labels) pairs; keep the epoch chosen by `keep` (see KeepBest).

    The training inputs may be a list of K augmented views (see Batches). With `augment` (AugmentParams), the
    training images are augmented on the fly as batches are made (see Batches); `trainable` must then take raw
    pixels. With `ema` (a momentum per step, 0: off), the moving average of the weights is validated and kept.
    With `label_smoothing` s, the loss (validation's too, so `keep: val_loss` ranks epochs by it) targets 1 - s/2
    and s/2; the class weights still follow the hard labels. With `mixup` (MixUp's alpha, 0: off), training batches
    are mixed (see Batches); validation never is.

    With `backup_dir`, checkpoints are written there (see Checkpoint) and a rerun after a crash resumes from the
    latest one, giving the same weights, curves and summary as a run that was never interrupted; the folder is
    deleted when training completes. DVCLive's summary holds the kept epoch's values, not the last epoch's.
    """
    batch_seed = int(np.random.randint(2**31))
    on_the_fly = (augment_lib.layers(augment, 0), int(np.random.randint(2**31))) if augment is not None else None
    weights = class_weights(train[1])
    # Drawn only when on, so runs without mixup keep their random draws.
    mixing = (mixup, int(np.random.randint(2**31)), weights) if mixup else None
    batches = Batches(*train, batch_size, seed=batch_seed, augment=on_the_fly, drop_remainder=True, mixup=mixing)
    with runtime.scope():
        trainable.compile(
            optimizer=keras.optimizers.Adam(learning_rate(lr, schedule, warmup_epochs, epochs, len(batches)),
                                            use_ema=ema > 0, ema_momentum=ema or 0.99),
            loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
            metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
            jit_compile=runtime.jit_compile,
        )
    # No checkpoint is written after the last epoch, so a resumed run always has epochs left to train.
    resumed = restore_checkpoint(backup_dir, trainable, runtime) if backup_dir is not None else ResumeState()
    start = batches.epoch = resumed.epochs_done  # the batch orders and augmentation continue from there
    early, history = KeepBest(keep, patience, epochs, resumed), resumed.history
    checkpoint = Checkpoint(backup_dir, early, history) if backup_dir is not None else None
    if start:
        print(f"  resuming an interrupted run after epoch {start} from {backup_dir}", flush=True)
    # What Keras really compiled: it drops XLA for a layer without jit support or under op determinism.
    print(f"  training {len(trainable.trainable_weights)} weight tensors for up to {epochs} epochs on "
          f"{len(train[1])} images ({len(val[1])} for validation), XLA {'on' if trainable.jit_compile else 'off'}"
          + (f", batches mixed by MixUp (alpha {mixup:g})" if mixup else ""), flush=True)
    with Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        live_metrics = LiveMetrics(live, history)
        for logs in history:  # the curves of the epochs before an interruption
            live_metrics.log(logs)
        # In this order at each epoch end: the average swapped in, then EarlyStopping's state and the logs are
        # final before a checkpoint.
        callbacks = [*([EMAWeights(resumed=start > 0)] if ema else []), early, live_metrics,
                     *([checkpoint] if checkpoint else [])]
        throughput = Throughput() if devicestats.enabled() else None  # make gpu-check only
        callbacks += [throughput] if throughput else []
        trainable.fit(
            _for_fit(batches), validation_data=_for_fit(Batches(*val, batch_size)),
            class_weight=None if mixup else weights,  # mixup's batches carry their own sample weights
            shuffle=False, epochs=epochs, initial_epoch=start, verbose=2, callbacks=callbacks,  # Batches orders itself
        )
        kept_epoch = early.kept_epoch(len(history))
        kept = history[kept_epoch]
        summary = {"best_epoch": kept_epoch + 1, "best_val_auc": round(kept["val_auc"], 4)}
        # `dvc exp show` compares these: the kept epoch's values, the ones the saved model has.
        live.summary["train"] = {k: v for k, v in kept.items() if not k.startswith("val_")}
        live.summary["eval"] = {k[len("val_"):]: v for k, v in kept.items() if k.startswith("val_")}
        live.summary.update(summary)
    if backup_dir is not None:
        shutil.rmtree(backup_dir, ignore_errors=True)
    if throughput is not None:
        devicestats.append(throughput.entry(Path(live_dir).name, len(train[1]), batch_size)
                           | {"mixed_precision": runtime.mixed_precision, "jit_compile": bool(trainable.jit_compile),
                              "backend": keras.backend.backend(), "gpus": runtime.gpus})
    return summary


def save(model: keras.Model, path: str | Path) -> None:
    """Saved in float32 whatever the training precision: a float16 model would compute in float16 wherever it
    is loaded (evaluate, predict, a CPU), with float16 logits; fine_tune rebuilds it under its own policy."""
    with atomic_path(path) as tmp:
        model_lib.with_policy(model, "float32").save(tmp)


def cache_train_val(prefix, train, val, dtype: str, label: str, augment=None):
    """Activations of the training and validation images, in one pass so both share the prefix's one traced shape.

    With `augment` (AugmentParams), the training activations are a list of augment.views arrays, one per
    augmented view of the training images (validation images are never augmented).
    """
    if prefix is None:
        return train[0], val[0]
    views = augment.views if augment is not None else 0
    check_resources(len(train[0]) * max(views, 1) + len(val[0]), prefix.output.shape[1:], dtype, label, views)
    if not views:
        acts = cache_activations(prefix, np.concatenate([train[0], val[0]]), dtype, "train+val")
        return acts[: len(train[0])], acts[len(train[0]) :]
    layers, seed = augment_lib.layers(augment, 0), int(np.random.randint(2**31))
    train_views = [cache_activations(prefix, train[0], dtype, f"train view {v + 1}/{views}", view=(layers, seed, v))
                   for v in range(views)]
    return train_views, cache_activations(prefix, val[0], dtype, "val")


def _split(model: keras.Model, block: str | None, runtime: Runtime):
    """(prefix, trainable part); only the trainable part is made under the distribution strategy.

    A Keras model trains under the strategy it was created in, so the trainable part is made in its
    scope. The frozen prefix is made outside it and runs on one device: under a strategy Keras 3's
    predict_on_batch hands every replica the whole batch and concatenates the copies.
    """
    prefix, _ = model_lib.split(model, block)
    with runtime.scope():
        _, trainable = model_lib.split(model, block)
    return prefix, trainable


def train_head(model: keras.Model, train, val, *, runtime: Runtime, augment=None, **fit_args) -> dict:
    """Phase 1: the whole backbone frozen; the head trains on pooled features computed once. 0 epochs: skipped."""
    if fit_args["epochs"] == 0:
        with Live(dir=str(fit_args["live_dir"]), dvcyaml=False, save_dvc_exp=False) as live:
            live.summary.update(best_epoch=0, skipped=True)  # the stage's declared output, saying so
        return {"best_epoch": 0, "best_val_auc": None}
    model_lib.set_trainable(model, None, train_batchnorm=False)
    prefix, head = _split(model, None, runtime)
    features = cache_train_val(prefix, train, val, "float32", "train_head", augment)
    return fit(head, (features[0], train[1]), (features[1], val[1]), runtime=runtime, **fit_args)


def fine_tune(model: keras.Model, train, val, *, block, train_batchnorm, cache_dtype, runtime: Runtime,
              augment=None, **fit_args) -> dict:
    """Phase 2: layers from `block` up train; the prefix before it runs once per image (and augmented view).

    From conv1 nothing is frozen, so augmentation (AugmentParams, or None) runs on the fly instead.
    """
    model_lib.set_trainable(model, block, train_batchnorm=train_batchnorm)
    prefix, suffix = _split(model, block, runtime)
    acts = cache_train_val(prefix, train, val, cache_dtype, "fine_tune", augment)
    return fit(suffix, (acts[0], train[1]), (acts[1], val[1]), runtime=runtime,
               augment=augment if prefix is None else None, **fit_args)
