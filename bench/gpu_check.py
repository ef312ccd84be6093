"""make gpu-check: the whole pipeline on a CUDA machine, then each path phase 2 can take, against that GPU's own floor.

    python bench/gpu_check.py --data PATH [--wheels DIR] [--epochs 20] [--image-size 224] [--batch-sizes 32,128]

Offline and self-contained: model.weights none, data.source a local file, nothing fetched from the internet.
The backend is TensorFlow where it imports, else JAX (KERAS_BACKEND=jax; an explicit KERAS_BACKEND wins). With
--wheels DIR, what the machine lacks (Keras, DVC, DVCLive, ...) is installed from DIR alone (pip --no-index) into
a virtualenv that also sees the machine's own packages (its JAX and CUDA libraries).

Steps, each under --step-timeout seconds and logged to <work>/gpu_check.log as it runs:
1. a temporary copy of this project (its files, without outputs, as a fresh git repo): the committed outputs
   are never written;
2. its params: the local data upsampled to --image-size px, weights none, phase 1 for --head-epochs epochs,
   phase 2 on the path `whole` (from conv1, no augmentation) for --epochs epochs, all of them run (keep last);
3. each stage by `dvc repro --single-item <stage>`, timed; the stages record their training throughput
   (training steps only) and the allocator's peak memory (pneumonia.devicestats);
4. phase 2 alone (`python -m stages.fine_tune`) for --extra-epochs epochs: `whole` at each further batch size,
   then each of --paths (PATHS) at the first; each run's phase entries are tagged with its path and with what
   the stage's own record (models/model.json) says it trained;
5. the floor of each trainable part and batch size run: fit of that part (the whole network on pixels, or the
   conv5 suffix on float16 activations) with the same loss, class weights, metrics and precision on one
   device-resident batch (no input pipeline), compile excluded;
6. the results, --out (bench/results_gpu.json), written after every step: a failed run keeps what it measured.

Cost on an H200 (estimated, not yet timed on one): the pipeline 3-4 minutes; the 4 phase-2 runs after it
(2 epochs each) and the 3 floors are mostly process start and XLA compiles, half a minute to a minute each: under
8 minutes in all if the compiles are quick, up to about 11 if each takes a minute (`--batch-sizes 32` then drops
a run and a floor). The runs' wall_s in the results tell which.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
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
# Phase 2's paths: name -> (fine_tune.unfreeze_from, augment.enabled). `whole` is the pipeline's own.
PATHS = {
    "whole": ("conv1", False),  # every layer trains on raw pixels
    "cached-conv5": ("conv5_block1", False),  # the ImageNet default: the frozen prefix cached once (CACHE_DTYPE)
    "cached-conv5-views": ("conv5_block1", True),  # the same, --views augmented views cached
    "whole-augmented": ("conv1", True),  # augmented on the fly where batches are made (XLA kept)
}
CACHE_DTYPE = "float16"


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
    p.add_argument("--extra-epochs", type=int, default=2, help="phase 2 epochs of each run after the pipeline")
    p.add_argument("--paths", default=",".join(list(PATHS)[1:]), help="phase 2 paths run after the pipeline, at "
                   "the first batch size (%(default)s; '' for none)")
    p.add_argument("--views", type=int, default=2, help="augment.views of cached-conv5-views")
    p.add_argument("--floor-steps", type=int, default=50, help="train steps per timed floor epoch")
    p.add_argument("--step-timeout", type=int, default=600, help="seconds any one step may take")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a dry run of the script itself)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    p.add_argument("--work", help=argparse.SUPPRESS)  # set when the script re-runs itself inside its virtualenv
    p.add_argument("--floor-worker", type=int, help=argparse.SUPPRESS)  # its batch size
    p.add_argument("--floor-block", default="conv1", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.paths = [name for name in args.paths.split(",") if name]
    if not set(args.paths) <= set(PATHS):
        p.error(f"--paths: each one of {', '.join(PATHS)}")
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

    def run(self, name: str, cmd: list, cwd: Path, env: dict) -> None:
        self.note(f"step {name}: {' '.join(map(str, cmd))} (timeout {self.timeout} s)")
        start = time.perf_counter()
        with open(self.log, "a") as f:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: a timeout kills its children too
            try:
                code = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepFailed(f"{name} ran past {self.timeout} s and was killed") from None
        if code != 0:
            raise StepFailed(f"{name} exited with {code}")
        self.note(f"step {name}: done in {time.perf_counter() - start:.1f} s")


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
    wrapper = work / "bin" / "python"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
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


def set_params(clone: Path, args, path: str, batch_size: int, epochs: int) -> None:
    import yaml

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params.update(image_size=args.image_size, batch_size=batch_size)
    params["data"].update(source=str(Path(args.data).resolve()), size=28)
    params["model"]["weights"] = "none"  # offline: no ImageNet weights
    params["train_head"].update(epochs=args.head_epochs, patience=max(args.head_epochs, 1))
    block, augment = PATHS[path]
    params["fine_tune"].update(epochs=epochs, patience=epochs, lr=args.lr, unfreeze_from=block, keep="last",
                               schedule="cosine")
    params["augment"].update(enabled=augment, views=args.views)
    params["compute"]["cache_dtype"] = CACHE_DTYPE
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def read_stats(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trained(record: Path) -> dict:
    """What phase 2 trained on, from the fine_tune stage's own record (models/model.json)."""
    ft = json.loads(record.read_text())["fine_tune"]
    block, augment, cached = ft["unfreeze_from"], ft["params"]["augment"], ft["unfreeze_from"] != "conv1"
    how = f"{augment['views']} cached views" if cached else "on the fly"
    return {"unfreeze_from": block, "augment": how if augment["enabled"] else "none",
            "cache_dtype": ft["params"]["compute"]["cache_dtype"] if cached else None}


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if shutil.which("nvidia-smi"):
        try:
            proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=60)
            info["gpus"] = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        except subprocess.TimeoutExpired:
            info["gpus"] = ["nvidia-smi timed out"]
    # The stages' interpreter is this one (interpreter() wraps sys.executable): its package records, no import.
    for package in ("keras", "dvc", "dvclive"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    return info


STAGE_KEYS = ("wall_s", "peak_device_memory_bytes")
RUN_KEYS = ("batch_size", "epochs", "unfreeze_from", "augment", "cache_dtype", "train_images_per_s",
            "mixed_precision", "jit_compile", *STAGE_KEYS)


def summarize(stats: list[dict], floors: dict) -> dict:
    """Per stage: wall time and peak memory; per phase: throughput; per phase-2 run: its path, what it trained and
    its throughput against the floor of the same trainable part at the same batch size."""
    phases, paths = [e for e in stats if "phase" in e], []
    for e in (e for e in phases if e["phase"] == "fine_tune"):  # untagged (older) entries: the pipeline's, conv1
        floor = floors.get(e.get("unfreeze_from", "conv1"), {}).get(e["batch_size"], {}).get("train_images_per_s")
        ratio = round(e["train_images_per_s"] / floor, 3) if floor and e["train_images_per_s"] else None
        paths.append({"path": e.get("path", "whole"), **{k: e.get(k) for k in RUN_KEYS}, "floor_images_per_s": floor,
                      "floor_ratio": ratio})
    return {"stages": {e["stage"]: e for e in stats if "stage" in e}, "phases": phases, "paths": paths,
            "phase2_over_floor": {p["batch_size"]: p["floor_ratio"] for p in paths if p["path"] == "whole"}}


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
               "config": {k: v for k, v in vars(args).items() if k not in ("work", "floor_worker", "floor_block",
                                                                        "result")}
               | {"weights": "none", "cache_dtype": CACHE_DTYPE}}
    out = Path(args.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    start = time.perf_counter()
    stats_file = work / "device_stats.jsonl"
    stats, floors = [], {}
    results["floor"] = floors  # {trainable part: {batch size: its floor}}

    def step(name: str, cmd: list, cwd: Path, path: str | None = None, alone: bool = False) -> None:
        """One step, then the results saved. The device stats it wrote join `stats`: its phases tagged with `path`,
        phase 2's also with what the stage's record says it trained and the stage's wall time and peak memory
        (the stage entry itself kept only from the pipeline, not from phase 2 run `alone`)."""
        stats_file.unlink(missing_ok=True)
        done = {}
        try:
            steps.run(name, cmd, cwd, env)
            record = cwd / "models" / "model.json"
            done = trained(record) if path and record.exists() else {}
        finally:
            new = read_stats(stats_file)
            done |= {k: e[k] for e in new if e.get("stage") == "fine_tune" for k in STAGE_KEYS}
            for entry in new:
                if "phase" in entry:
                    entry |= {"path": path} | (done if entry["phase"] == "fine_tune" else {})
                if "phase" in entry or not alone:
                    stats.append(entry)
            results.update(summarize(stats, floors))
            save()

    try:
        if not Path(args.data).is_file():
            raise StepFailed(f"no data file {args.data}; pass --data path/to/pneumoniamnist.npz")
        python = interpreter(work)
        backend = detect_backend(python, steps)
        env = {**os.environ, "PATH": f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "KERAS_BACKEND": backend, "DVC_NO_ANALYTICS": "1", "PNEUMONIA_DEVICE_STATS": str(stats_file),
               "XDG_CACHE_HOME": str(work / "cache")}
        results["backend"], results["machine"] = backend, machine()
        if not args.allow_cpu and not results["machine"].get("gpus"):
            raise StepFailed("no GPU visible (nvidia-smi lists none); --allow-cpu runs the check on CPU anyway")
        save()
        clone = copy_project(work / "project", steps, env)
        first, *more = args.batch_sizes
        set_params(clone, args, "whole", first, args.epochs)
        for stage in STAGES:
            step(stage, [python, "-m", "dvc", "repro", "--single-item", stage], clone, "whole")
        results["metrics"] = json.loads((clone / "metrics" / "metrics.json").read_text())["test"]
        results["pipeline_wall_s"] = round(sum(results["stages"][s]["wall_s"] for s in STAGES), 1)
        # Phase 2 alone (nothing kept): the whole network at the further batch sizes, then the other paths.
        for path, batch_size in [("whole", b) for b in more] + [(p, first) for p in args.paths]:
            set_params(clone, args, path, batch_size, args.extra_epochs)
            step(f"fine_tune {path} at batch {batch_size}", [python, "-m", "stages.fine_tune"], clone, path, alone=True)
        for block, batch_size in dict.fromkeys((p["unfreeze_from"], p["batch_size"]) for p in results["paths"]):
            result = work / f"floor-{block}-{batch_size}.json"
            step(f"floor {block} at batch {batch_size}",
                 [python, Path(__file__).resolve(), "--floor-worker", batch_size, "--floor-block", block, "--result",
                  result, "--image-size", args.image_size, "--lr", args.lr, "--floor-steps", args.floor_steps], ROOT)
            floors.setdefault(block, {})[batch_size] = json.loads(result.read_text())
        results |= summarize(stats, floors)
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
    for phase in (p for p in results.get("phases", []) if p["phase"] == "train_head"):
        lines.append(f"  phase 1 at batch {phase['batch_size']}: {phase['train_images_per_s']} images/s "
                     f"(mixed precision {phase['mixed_precision']}, XLA {phase['jit_compile']})")
    for run in results.get("paths", []):
        cache = f", {run['cache_dtype']} cache" if run["cache_dtype"] else ""
        lines.append(f"  phase 2 {run['path']:<19} at batch {run['batch_size']}: {run['train_images_per_s']} images/s, "
                     f"floor {run['floor_images_per_s']}, phase 2 / floor {run['floor_ratio']} (from "
                     f"{run['unfreeze_from']}{cache}, augment {run['augment']}, mixed precision "
                     f"{run['mixed_precision']}, XLA {run['jit_compile']})")
    if "metrics" in results:
        m = results["metrics"]
        lines.append(f"  test: ROC AUC {m['roc_auc']}, accuracy {m['accuracy']}, sensitivity {m['recall']}, "
                     f"specificity {m['specificity']}")
    if "failed" in results:
        lines.append(f"  FAILED: {results['failed']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the floor (its own process)

def floor_worker(args) -> None:
    """What phase 2 trains from args.floor_block, its compile settings, through fit on one device-resident batch
    (pixels, or the frozen prefix's activations in CACHE_DTYPE): no input pipeline. Timed as the stages are
    (train.Throughput), the first epoch's compiles left out."""
    import keras
    import numpy as np

    from pneumonia import devicestats
    from pneumonia import model as model_lib
    from pneumonia import train
    from pneumonia.params import ComputeParams

    batch = args.floor_worker
    runtime = train.configure(42, ComputeParams())  # auto: mixed precision and XLA with a GPU, as the stages
    with runtime.scope():
        net = model_lib.build(args.image_size, "none", 0.2)
        model_lib.set_trainable(net, args.floor_block, train_batchnorm=True)  # as fine_tune with weights none
        prefix, part = model_lib.split(net, args.floor_block)
        part.compile(optimizer=keras.optimizers.Adam(args.lr), loss=keras.losses.BinaryCrossentropy(),
                     metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
                     jit_compile=runtime.jit_compile)
    rng = np.random.default_rng(0)
    labels = (rng.random(batch) < 0.74).astype("int32")
    weights = train.class_weights(np.r_[labels, 0, 1])  # PneumoniaMNIST-like imbalance, both classes present
    x = rng.integers(0, 256, (batch, args.image_size, args.image_size, 1), dtype="uint8")
    if prefix is not None:
        x = keras.ops.convert_to_numpy(prefix.predict_on_batch(x)).astype(CACHE_DTYPE)
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(labels)
    w = keras.ops.convert_to_tensor(np.array([weights[int(v)] for v in labels], "float32"))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        data, val = (tf.data.Dataset.from_tensors(item).repeat().prefetch(2) for item in ((x, y, w), (x, y)))
    else:
        def forever(item):
            while True:
                yield item

        data, val = forever((x, y, w)), forever((x, y))
    timer = train.Throughput()
    part.fit(data, steps_per_epoch=args.floor_steps, epochs=3, validation_data=val, validation_steps=args.floor_steps,
             shuffle=False, verbose=0, callbacks=[timer])
    images = batch * args.floor_steps
    val_s = timer.val_s[1:]
    result = timer.entry("floor", images, batch) | {
        "unfreeze_from": args.floor_block, "steps_per_epoch": args.floor_steps,
        "val_images_per_s": round(images * len(val_s) / sum(val_s), 1),
        "mixed_precision": runtime.mixed_precision, "jit_compile": bool(part.jit_compile),
        "backend": keras.backend.backend(), "peak_device_memory_bytes": devicestats.peak_memory_bytes()}
    Path(args.result).write_text(json.dumps(result))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.floor_worker:
        floor_worker(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
