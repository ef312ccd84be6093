"""make gpu-check: the whole pipeline on a CUDA machine, measured against that GPU's own floor.

    python bench/gpu_check.py --data PATH [--wheels DIR] [--epochs 20] [--image-size 224] [--batch-sizes 32,128]

Offline and self-contained: model.weights none, data.source a local file, nothing fetched from the internet.
The backend is TensorFlow where it imports, else JAX (KERAS_BACKEND=jax; an explicit KERAS_BACKEND wins). With
--wheels DIR, what the machine lacks (Keras, DVC, DVCLive, ...) is installed from DIR alone (pip --no-index) into
a virtualenv that also sees the machine's own packages (its JAX and CUDA libraries).

Steps, each under --step-timeout seconds and logged to <work>/gpu_check.log as it runs:
1. a temporary copy of this project (its files, without outputs, as a fresh git repo), so the committed outputs
   are never written;
2. its params: the local data upsampled to --image-size px, weights none, phase 1 for --head-epochs epochs,
   phase 2 from conv1 (the whole network) for --epochs epochs, all of them run (keep last);
3. each stage by `dvc repro --single-item <stage>`, timed; the stages themselves record their training
   throughput (training steps only, the validation pass apart) and the allocator's peak memory
   (pneumonia.devicestats);
4. phase 2 again for --extra-epochs epochs at each further batch size, for its throughput;
5. the floor, per batch size: a Keras train step of the same network, loss, class weights, metrics and
   precision, through fit on one device-resident batch (no input pipeline), compile excluded;
6. the results, --out (bench/results_gpu.json), written after every step, so a failed run keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("download", "resize", "train_head", "fine_tune", "evaluate", "error_analysis")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
# Installed from --wheels when missing: what the stages import beyond a JAX or TensorFlow machine's own packages.
PACKAGES = ("keras", "dvc", "dvclive", "numpy", "scipy", "scikit-learn", "pandas", "matplotlib", "pillow", "pyyaml",
            "psutil", "tqdm", "medmnist")


class StepFailed(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a local PneumoniaMNIST .npz (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results_gpu.json"))
    p.add_argument("--wheels", help="a folder of wheels to install what is missing from (offline)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--head-epochs", type=int, default=1, help="phase 1 epochs (0 skips it)")
    p.add_argument("--epochs", type=int, default=20, help="phase 2 epochs, the whole network")
    p.add_argument("--lr", type=float, default=1e-3, help="phase 2 learning rate (from scratch)")
    p.add_argument("--batch-sizes", default="32,128", help="the first is the pipeline run's; the others time phase 2")
    p.add_argument("--extra-epochs", type=int, default=3, help="phase 2 epochs at each further batch size")
    p.add_argument("--floor-steps", type=int, default=50, help="train steps per timed floor epoch")
    p.add_argument("--step-timeout", type=int, default=600, help="seconds any one step may take")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a dry run of the script itself)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    p.add_argument("--work", help=argparse.SUPPRESS)  # set when the script re-runs itself inside its virtualenv
    p.add_argument("--floor-worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    return args


# ---------------------------------------------------------------- steps, each bounded and logged

class Steps:
    """Runs each step in its own process group under a timeout, appending its output to one log file."""

    def __init__(self, log: Path, timeout: int):
        self.log, self.timeout = log, timeout

    def note(self, text: str) -> None:
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def run(self, name: str, cmd: list, cwd: Path, env: dict, timeout: int | None = None) -> float:
        timeout = timeout or self.timeout
        self.note(f"step {name}: {' '.join(map(str, cmd))} (timeout {timeout} s)")
        start = time.perf_counter()
        with open(self.log, "a") as f:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: a timeout kills its children too
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepFailed(f"{name} ran past {timeout} s and was killed") from None
        wall = time.perf_counter() - start
        if code != 0:
            raise StepFailed(f"{name} exited with {code}")
        self.note(f"step {name}: done in {wall:.1f} s")
        return wall


def detect_backend(python: str, steps: Steps) -> str:
    """KERAS_BACKEND if set; else tensorflow where it imports, else jax (each import bounded: one has hung)."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    for backend in ("tensorflow", "jax"):
        try:
            proc = subprocess.run([python, "-c", f"import {backend}"], capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            steps.note(f"importing {backend} took over 120 s; not used")
            continue
        if proc.returncode == 0:
            return backend
    raise StepFailed("neither TensorFlow nor JAX imports; install one (JAX: pip install jax[cuda12])")


def install_and_rerun(work: Path, wheels: str, steps: Steps) -> None:
    """Install what is missing from `wheels` into a virtualenv that sees the machine's packages, then continue
    this script inside it (its PyYAML, DVC and Keras are the ones installed there)."""
    venv = work / "venv"
    steps.run("venv", [sys.executable, "-m", "venv", "--system-site-packages", venv], work, os.environ.copy())
    python = str(venv / "bin" / "python")
    # Only what is missing: the machine's own packages satisfy the rest (no versions pinned for that reason).
    steps.run("install", [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, *PACKAGES],
              work, os.environ.copy())
    os.execv(python, [python, str(Path(__file__).resolve()), *sys.argv[1:], "--work", str(work)])


def interpreter(work: Path) -> str:
    """This python, first on PATH as a wrapper script: DVC runs `python -m stages.<name>`, and a symlink to a
    virtualenv's interpreter would lose the virtualenv's packages."""
    python = sys.executable
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


# Outputs, caches and environments at the project's top level, and DVC's own cache: not copied.
TOP_LEVEL_SKIP = {".git", ".venv", "data", "models", "dvclive", "metrics", "plots", "reports", ".cache", "wheels",
                  "dvc_plots"}


def copy_project(clone: Path, steps: Steps, env: dict) -> Path:
    """The project's files without outputs or caches, as a new git repo (DVC wants one): works from a checkout
    and from a bare copy of the working tree alike."""
    def ignore(folder, names):
        rel = Path(folder).relative_to(ROOT)
        skip = {"__pycache__", ".pytest_cache"} | (TOP_LEVEL_SKIP if rel == Path(".") else set())
        skip |= {"cache", "tmp"} if rel == Path(".dvc") else set()
        return [n for n in names if n in skip]

    shutil.copytree(ROOT, clone, ignore=ignore)
    git_env = {**env, "GIT_AUTHOR_NAME": "gpu-check", "GIT_AUTHOR_EMAIL": "gpu-check@localhost",
               "GIT_COMMITTER_NAME": "gpu-check", "GIT_COMMITTER_EMAIL": "gpu-check@localhost"}
    steps.run("git init", ["git", "init", "-q"], clone, git_env)
    steps.run("git commit", ["sh", "-c", "git add -A && git commit -qm 'gpu-check copy'"], clone, git_env)
    return clone


def set_params(clone: Path, args, batch_size: int, epochs: int) -> None:
    import yaml

    path = clone / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params.update(image_size=args.image_size, batch_size=batch_size)
    params["data"].update(source=str(Path(args.data).resolve()), size=28)
    params["model"]["weights"] = "none"  # offline: no ImageNet weights
    params["train_head"].update(epochs=args.head_epochs, patience=max(args.head_epochs, 1))
    params["fine_tune"].update(epochs=epochs, patience=epochs, lr=args.lr, unfreeze_from="conv1", keep="last",
                               schedule="cosine")
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def read_stats(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def machine(python: str, env: dict) -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if shutil.which("nvidia-smi"):
        try:
            proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=60)
            info["gpus"] = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        except subprocess.TimeoutExpired:
            info["gpus"] = ["nvidia-smi timed out"]
    proc = subprocess.run([python, "-c", "import keras, dvc, dvclive; print(keras.__version__, dvc.__version__, "
                           "dvclive.__version__)"], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode == 0:
        info["keras"], info["dvc"], info["dvclive"] = proc.stdout.split()
    return info


def summarize(stats: list[dict], floors: dict, batch_sizes: list[int]) -> dict:
    """Per stage: wall time and peak memory; per phase: throughput; phase 2 against the floor per batch size."""
    stages = {e["stage"]: e for e in stats if "stage" in e}
    phases = [e for e in stats if "phase" in e]
    phase2 = {}
    for entry in phases:
        if entry["phase"] == "fine_tune":
            phase2.setdefault(entry["batch_size"], entry)  # the pipeline run first, then the extra batch sizes
    ratios = {}
    for b in batch_sizes:
        project, floor = phase2.get(b, {}).get("train_images_per_s"), floors.get(b, {}).get("train_images_per_s")
        ratios[b] = round(project / floor, 3) if project and floor else None
    return {"stages": stages, "phases": phases, "phase2_over_floor": ratios}


def orchestrate(args) -> int:
    work = Path(args.work or tempfile.mkdtemp(prefix="pneumonia-gpu-check-"))
    steps = Steps(work / "gpu_check.log", args.step_timeout)
    if args.wheels and not args.work:
        try:
            install_and_rerun(work, args.wheels, steps)  # does not return
        except StepFailed as exc:
            steps.note(f"FAILED: {exc}; see {steps.log}")
            return 1
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "log": str(steps.log),
               "config": {"data": str(args.data), "image_size": args.image_size, "head_epochs": args.head_epochs,
                          "epochs": args.epochs, "lr": args.lr, "batch_sizes": args.batch_sizes,
                          "extra_epochs": args.extra_epochs, "floor_steps": args.floor_steps, "weights": "none",
                          "unfreeze_from": "conv1", "step_timeout_s": args.step_timeout}}
    out = Path(args.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    start = time.perf_counter()
    stats_file = work / "device_stats.jsonl"
    floors = {}
    try:
        if not Path(args.data).is_file():
            raise StepFailed(f"no data file {args.data}; pass --data path/to/pneumoniamnist.npz")
        python = interpreter(work)
        backend = detect_backend(python, steps)
        env = {**os.environ, "PATH": f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "KERAS_BACKEND": backend, "DVC_NO_ANALYTICS": "1", "PNEUMONIA_DEVICE_STATS": str(stats_file),
               "XDG_CACHE_HOME": str(work / "cache")}
        results["backend"], results["machine"] = backend, machine(python, env)
        if not args.allow_cpu and not results["machine"].get("gpus"):
            raise StepFailed("no GPU visible (nvidia-smi lists none); --allow-cpu runs the check on CPU anyway")
        save()
        clone = copy_project(work / "project", steps, env)
        first, *more = args.batch_sizes
        set_params(clone, args, first, args.epochs)
        for stage in STAGES:
            steps.run(stage, [python, "-m", "dvc", "repro", "--single-item", stage], clone, env)
            results |= summarize(read_stats(stats_file), floors, args.batch_sizes)
            save()
        results["metrics"] = json.loads((clone / "metrics" / "metrics.json").read_text())["test"]
        results["pipeline_wall_s"] = round(sum(results["stages"][s]["wall_s"] for s in STAGES), 1)
        for batch_size in more:  # phase 2 alone at a larger batch: its throughput, nothing kept
            set_params(clone, args, batch_size, args.extra_epochs)
            steps.run(f"fine_tune at batch {batch_size}", [python, "-m", "stages.fine_tune"], clone, env)
        for batch_size in args.batch_sizes:
            result = work / f"floor-{batch_size}.json"
            steps.run(f"floor at batch {batch_size}", [python, Path(__file__).resolve(), "--floor-worker", batch_size,
                                                       "--result", result, "--image-size", args.image_size, "--lr",
                                                       args.lr, "--floor-steps", args.floor_steps], ROOT, env)
            floors[batch_size] = json.loads(result.read_text())
        results["floor"] = floors
        results |= summarize(read_stats(stats_file), floors, args.batch_sizes)
        status = 0
    except StepFailed as exc:
        results["failed"] = str(exc)
        steps.note(f"FAILED: {exc}; see {steps.log}")
        status = 1
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    save()
    print(report(results))
    print(f"gpu-check: results in {out}, log in {steps.log}")
    if args.keep:
        print(f"gpu-check: temporary folder kept: {work}")
    elif status == 0:
        shutil.rmtree(work, ignore_errors=True)
    return status


def report(results: dict) -> str:
    lines = [f"backend {results.get('backend')}, machine {results.get('machine', {}).get('gpus', 'CPU only')}"]
    for name, stage in results.get("stages", {}).items():
        peak = stage.get("peak_device_memory_bytes")
        lines.append(f"  {name:<15}{stage['wall_s']:>8.1f} s  peak device memory "
                     + (f"{peak / 2**30:.2f} GiB" if peak else "n/a"))
    for phase in results.get("phases", []):
        lines.append(f"  {phase['phase']} at batch {phase['batch_size']}: {phase['train_images_per_s']} images/s "
                     f"(training steps; mixed precision {phase['mixed_precision']}, XLA {phase['jit_compile']})")
    for b, floor in results.get("floor", {}).items():
        lines.append(f"  floor at batch {b}: {floor['train_images_per_s']} images/s; phase 2 / floor "
                     f"{results['phase2_over_floor'].get(b)}")
    if "metrics" in results:
        m = results["metrics"]
        lines.append(f"  test: ROC AUC {m['roc_auc']}, accuracy {m['accuracy']}, sensitivity {m['recall']}, "
                     f"specificity {m['specificity']}")
    if "failed" in results:
        lines.append(f"  FAILED: {results['failed']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the floor (its own process)

def floor_worker(args) -> None:
    """Phase 2's network and compile settings on one device-resident batch, through fit: no input pipeline."""
    import time as clock

    import keras
    import numpy as np

    from pneumonia import model as model_lib
    from pneumonia import train
    from pneumonia.params import ComputeParams

    batch = args.floor_worker
    runtime = train.configure(42, ComputeParams())  # auto: mixed precision and XLA with a GPU, as the stages
    with runtime.scope():
        net = model_lib.build(args.image_size, "none", 0.2)
        model_lib.set_trainable(net, "conv1", train_batchnorm=True)  # what fine_tune trains with weights none
        net.compile(optimizer=keras.optimizers.Adam(args.lr), loss=keras.losses.BinaryCrossentropy(),
                    metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
                    jit_compile=runtime.jit_compile)
    rng = np.random.default_rng(0)
    labels = (rng.random(batch) < 0.74).astype("int32")
    weights = train.class_weights(np.r_[labels, 0, 1])  # PneumoniaMNIST-like imbalance, both classes present
    x = keras.ops.convert_to_tensor(rng.integers(0, 256, (batch, args.image_size, args.image_size, 1), dtype="uint8"))
    y = keras.ops.convert_to_tensor(labels)
    w = keras.ops.convert_to_tensor(np.array([weights[int(v)] for v in labels], "float32"))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        data = tf.data.Dataset.from_tensors((x, y, w)).repeat().prefetch(2)
        val = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)
    else:
        def data_gen():
            while True:
                yield x, y, w

        def val_gen():
            while True:
                yield x, y

        data, val = data_gen(), val_gen()

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = clock.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])  # waits for the last step
            self.times.append(clock.perf_counter() - self.start)

    timer = EpochTimes()
    net.fit(data, steps_per_epoch=args.floor_steps, epochs=3, verbose=0, callbacks=[timer])  # epoch 1 compiles
    net.evaluate(val, steps=args.floor_steps, verbose=0)  # compiles the test step
    start = clock.perf_counter()
    net.evaluate(val, steps=args.floor_steps, verbose=0)
    val_s = clock.perf_counter() - start
    steady = min(timer.times[1:])
    result = {"batch_size": batch, "steps_per_epoch": args.floor_steps, "epoch_s": [round(t, 3) for t in timer.times],
              "train_images_per_s": round(batch * args.floor_steps / steady, 1),
              "val_images_per_s": round(batch * args.floor_steps / val_s, 1),
              "mixed_precision": runtime.mixed_precision, "jit_compile": runtime.jit_compile,
              "backend": keras.backend.backend()}
    from pneumonia import devicestats

    result["peak_device_memory_bytes"] = devicestats.peak_memory_bytes()
    Path(args.result).write_text(json.dumps(result))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.floor_worker:
        floor_worker(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
