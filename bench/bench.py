"""make bench: the project's training (cached activations) against plain `model.fit`, phase by phase.

For each phase, on the same data subset, params, seed and epochs, each in its own process:

  a      the project's code: pneumonia.train.train_head / fine_tune, called as the stages call them
         (DVCLive and the per-epoch resume checkpoints write into a temporary folder)
  b      the plain route: `fit` on the whole model (model.build + set_trainable, the same layers frozen),
         from in-memory arrays, with the same optimizer, learning rate, batch size, class weights and epochs
  k      a with training-time augmentation: K augmented views of each training image through the frozen
         prefix (--views), what K costs in time and memory against a
  floor  the compute floor: one forward pass of the frozen prefix over train+val images, plus the
         measured time of one epoch of the trainable suffix alone (train steps on precomputed
         activations and the validation pass) times the epochs; compiled functions warmed up first

Phase 2 starts, in a, b and floor alike, from one phase-1 model (the one variant a of phase 1 saves).
Early stopping is off (patience = epochs) so every variant runs every epoch. BatchNorm follows the
fine_tune stage's rule in all three: frozen with ImageNet weights, trained in the suffix with weights none.

Each variant reports wall time, its own CPU time, and the CPU time other processes on the machine used
meanwhile ("others", in cores): wall-time ratios are only as good as the machine was quiet, CPU-time
ratios hold up better when it was not.

    python bench/bench.py                      # defaults: 224 px, 320/96 images, 10 epochs per phase
    python bench/bench.py --image-size 64 --train 64 --val 32 --epochs 2   # a quick look
    python bench/bench.py --full-data          # peak memory of the real stages on all 4708+524 images

Timing noise on a shared machine is one-sided (a run is only ever slowed down), so a and the floor run
--repeats times, interleaved, and the fastest run of each counts; every run's time is kept in the results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
DEFAULT_OUT = ROOT / "bench" / "results.json"
TARGETS = {"phase1_speedup": 5.0, "phase2_speedup": 1.5, "a_over_floor": 1.2}
VARIANTS = ("a", "b", "k", "floor")
WORKER_TIMEOUT_S = 6 * 3600


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a MedMNIST-layout PneumoniaMNIST .npz (default: %(default)s)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train", type=int, default=320, help="training images (stratified, seeded subset)")
    p.add_argument("--val", type=int, default=96, help="validation images (stratified, seeded subset)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per phase")
    p.add_argument("--weights", choices=("none", "imagenet"), default="none",
                   help="ResNet-50 start weights (default none: ImageNet weights cannot be downloaded on every machine)")
    p.add_argument("--unfreeze-from", default="conv5_block1", help="phase 2 first trainable block")
    p.add_argument("--lr", type=float, default=1e-4, help="phase 1 learning rate")
    p.add_argument("--fine-tune-lr", type=float, default=1e-5, help="phase 2 learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache-dtype", choices=("float16", "float32"), default="float16", help="phase 2 activation cache")
    p.add_argument("--views", type=int, default=4, help="augmented views cached per training image in variant k")
    p.add_argument("--floor-epochs", type=int, default=2, help="suffix epochs timed for the floor (at most --epochs)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of a and of the floor per phase, the fastest kept (b, 10x slower, and k run once)")
    p.add_argument("--full-data", action="store_true",
                   help="instead: run the real stages (download .. fine_tune) on every train and val image at "
                        "--image-size and record each stage's peak RSS, into the results file's full_data entry")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, models) and print its path")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- orchestration (no TensorFlow here)

def subset(images, labels, n: int, seed: int):
    """A stratified, seeded subset of n images (all of them when n >= the split size)."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    labels = labels.reshape(-1)
    if n >= len(labels):
        return images, labels
    idx, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    idx = np.sort(idx)
    return images[idx], labels[idx]


def prepare_data(args, work: Path) -> dict:
    import numpy as np

    from pneumonia import data

    info = data.dataset_info()
    arrays = data.load_npz(args.data, info)
    out = {}
    for split, n in (("train", args.train), ("val", args.val)):
        images, labels = subset(arrays[f"{split}_images"], arrays[f"{split}_labels"], n, args.seed)
        out[f"{split}_x"] = data.resize_images(images, args.image_size, "bilinear")[..., None]
        out[f"{split}_y"] = labels.astype("int32")  # as data.load_split returns them
    np.savez(work / "subset.npz", **out)
    full = {split: info.n_samples[split] for split in ("train", "val")}
    counts = {split: {"images": int(len(out[f"{split}_y"])), "pneumonia": int(out[f"{split}_y"].sum())} for split in ("train", "val")}
    return {"full_sizes": full, "subset": counts}


def child_env(**extra) -> dict:
    """The environment of the worker and stage processes: TensorFlow's start-up log kept quiet unless asked for."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), **extra}


def run_worker(name: str, spec: dict, work: Path) -> dict:
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps({**spec, "result": str(work / f"{name}.result.json")}))
    log = work / f"{name}.log"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path)],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=WORKER_TIMEOUT_S,
            env=child_env(),
        )
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        sys.exit(f"bench: worker {name} failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    result = json.loads((work / f"{name}.result.json").read_text())
    result["process_wall_s"] = round(time.perf_counter() - start, 2)
    result["load_avg_1min_before"] = round(load_before, 2)
    print(f"  {name:<9} {result.get('wall_s', result.get('total_s')):>8.1f} s", flush=True)
    return result


def fastest(variant: str, runs: list[dict]) -> dict:
    """The least disturbed of a variant's runs, with every run's time alongside."""
    key = "total_s" if variant == "floor" else "wall_s"
    best = dict(min(runs, key=lambda r: r[key]))
    best["runs_s"] = [r[key] for r in runs]
    return best


def run_variants(phase: int, spec: dict, work: Path, repeats: int) -> dict:
    """Each variant of a phase; a and the floor `repeats` times, interleaved with the others, the fastest counting."""
    runs = {v: [] for v in VARIANTS}
    for repeat in range(max(1, repeats)):
        for v in VARIANTS:
            if v in ("a", "floor") or repeat == 0:
                runs[v].append(run_worker(f"{v}{phase}", spec, work))
    return {v: fastest(v, r) for v, r in runs.items()}


def save_results(path, update: dict) -> dict:
    """Merge `update` into the results file: the timing run and the --full-data run each replace only their own keys."""
    out = Path(path)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update(update)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def ratio(x: float, y: float) -> float | None:
    return round(x / y, 3) if y > 0 and math.isfinite(x / y) else None


def summarize(args, phases: dict) -> dict:
    out = {}
    for phase, res in phases.items():
        a, b, k, floor = res["a"], res["b"], res["k"], res["floor"]
        images = res["a"]["train_images"] * args.epochs
        for v in (a, b, k, floor):
            wall = v["wall_s"] if v is not floor else v["timed_wall_s"]
            if v is not floor:
                v["images_per_s"] = round(images / wall, 2)
            # CPU cores other processes kept busy on average while this variant was timed
            v["other_processes_cores"] = round(v["other_processes_cpu_s"] / wall, 2) if wall > 0 else 0.0
        out[phase] = {
            **res,
            "speedup_b_over_a": ratio(b["wall_s"], a["wall_s"]),
            "a_over_floor": ratio(a["wall_s"], floor["total_s"]),
            "b_over_floor": ratio(b["wall_s"], floor["total_s"]),
            "cpu_speedup_b_over_a": ratio(b["cpu_s"], a["cpu_s"]),
            "cpu_a_over_floor": ratio(a["cpu_s"], floor["total_cpu_s"]),
            "val_auc_difference": round(abs(a["val_auc"] - b["val_auc"]), 4),
            "views_k_over_a": ratio(k["wall_s"], a["wall_s"]),
            "views_cpu_k_over_a": ratio(k["cpu_s"], a["cpu_s"]),
            "views_peak_rss_k_over_a": ratio(k["peak_rss_mib"], a["peak_rss_mib"]),
        }
    return out


def targets_met(phases: dict) -> dict:
    return {
        "phase1_speedup": phases["phase1"]["speedup_b_over_a"] >= TARGETS["phase1_speedup"],
        "phase2_speedup": phases["phase2"]["speedup_b_over_a"] >= TARGETS["phase2_speedup"],
        "phase1_a_over_floor": phases["phase1"]["a_over_floor"] <= TARGETS["a_over_floor"],
        "phase2_a_over_floor": phases["phase2"]["a_over_floor"] <= TARGETS["a_over_floor"],
    }


def table(results: dict) -> str:
    c = results["config"]
    lines = [
        f"PneumoniaMNIST subset: {c['train_images']} train / {c['val_images']} val images ({c['data']}), {c['image_size']} px, "
        f"{c['epochs']} epochs per phase, batch {c['batch_size']}, seed {c['seed']}, weights {c['weights']}",
        f"machine: {results['machine']['cpus']} CPU cores, {results['machine']['backend']} {results['machine']['device']}, "
        f"{results['date']}",
    ]
    if c["weights"] == "none":
        lines.append("weights none: ImageNet weights cannot be downloaded on this machine (--weights imagenet where they can)")
    lines += [
        "",
        f"{'phase':<6}{'variant':<34}{'wall s':>8}{'images/s':>10}{'CPU s':>8}{'others':>8}{'peak RSS MiB':>14}"
        f"{'val AUC':>9}{'best ep':>8}",
    ]
    for key, phase in results["phases"].items():
        n = key[-1]
        names = {"a": "a  project (cached activations)", "b": "b  plain fit on the full model",
                 "k": f"k  a + augmentation, {c['views']} views"}
        for v in ("a", "b", "k"):
            r = phase[v]
            lines.append(f"{n:<6}{names[v]:<34}{r['wall_s']:>8.1f}{r['images_per_s']:>10.1f}{r['cpu_s']:>8.1f}"
                         f"{r['other_processes_cores']:>8.2f}{r['peak_rss_mib']:>14.0f}{r['val_auc']:>9.4f}{r['best_epoch']:>8d}")
        f = phase["floor"]
        lines.append(f"{n:<6}{'floor  prefix once + suffix x ep':<34}{f['total_s']:>8.1f}{'':>10}{f['total_cpu_s']:>8.1f}"
                     f"{f['other_processes_cores']:>8.2f}   = {f['prefix_s']:.1f} s + {f['suffix_epoch_s']:.2f} s x {f['epochs']}")
        lines.append(f"{'':<6}speed-up b/a {phase['speedup_b_over_a']:.2f}x (CPU {phase['cpu_speedup_b_over_a']:.2f}x)   "
                     f"a/floor {phase['a_over_floor']:.2f} (CPU {phase['cpu_a_over_floor']:.2f})   b/floor {phase['b_over_floor']:.2f}   "
                     f"|val AUC a - b| {phase['val_auc_difference']:.4f}")
        lines.append(f"{'':<6}{c['views']} augmented views cost k/a {phase['views_k_over_a']:.2f}x wall "
                     f"(CPU {phase['views_cpu_k_over_a']:.2f}x), peak RSS {phase['views_peak_rss_k_over_a']:.2f}x")
    lines.append("others: CPU cores that other processes on the machine kept busy, on average, while the variant was timed")
    t, m = results["targets"], results["targets_met"]
    yes = {True: "met", False: "NOT met"}
    lines += [
        "",
        f"targets: phase 1 speed-up >= {t['phase1_speedup']}x {yes[m['phase1_speedup']]}; "
        f"phase 2 speed-up >= {t['phase2_speedup']}x {yes[m['phase2_speedup']]}; "
        f"a/floor <= {t['a_over_floor']}: phase 1 {yes[m['phase1_a_over_floor']]}, phase 2 {yes[m['phase2_a_over_floor']]}",
    ]
    e = results["memory_estimate_full_data"]
    lines += [
        "",
        f"memory ESTIMATE (computed, not measured) for full train+val ({e['images']} images) at {e['image_size']} px:",
        f"  phase 2 {e['cache_dtype']} activation cache at {e['unfreeze_from']} {tuple(e['phase2_activation_shape'])}: "
        f"{e['phase2_cache_gib']:.2f} GiB; with augmentation, {e['views']} views of the train images: "
        f"{e['phase2_cache_with_views_gib']:.2f} GiB",
        f"  phase 1 float32 pooled features {tuple(e['phase1_feature_shape'])}: {e['phase1_cache_gib']:.3f} GiB; "
        f"resized uint8 images: {e['images_gib']:.3f} GiB",
        f"  {e['note']}",
    ]
    if "full_data" in results:
        lines += ["", full_data_table(results["full_data"])]
    else:
        lines.append("full-data measurement: none yet (python bench/bench.py --full-data)")
    return "\n".join(lines)


def full_data_table(f: dict) -> str:
    c = f["config"]
    lines = [f"MEASURED, the real stages on all {c['train_images']} train + {c['val_images']} val images at {c['image_size']} px "
             f"({c['epochs']} epochs per phase, weights {c['weights']}, cache {c['cache_dtype']}), {f['date']}:"]
    for name, r in f["stages"].items():
        epochs = f", {r['epochs_run']} epochs" if "epochs_run" in r else ""
        lines.append(f"  {name:<11}{r['wall_s']:>8.1f} s  peak RSS {r['peak_rss_mib'] / 1024:6.2f} GiB{epochs}")
    lines.append(f"  peak over the stages: {f['peak_rss_gb']:.2f} GB (target <= {f['target_gb']} GB: "
                 f"{'met' if f['target_met'] else 'NOT met'})")
    return "\n".join(lines)


FULL_DATA_STAGES = ("download", "resize", "train_head", "fine_tune")
TARGET_GB = 8.0


def full_data(args) -> dict:
    """The real stage scripts, on every train and val image, each stage's peak RSS as the kernel counts it (wait4)."""
    import numpy as np
    import yaml

    work = Path(tempfile.mkdtemp(prefix="pneumonia-fulldata-"))
    try:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params.update(seed=args.seed, lr=args.lr, image_size=args.image_size, batch_size=args.batch_size)
        params["data"]["source"] = str(Path(args.data).resolve())
        params["model"].update(weights=args.weights, dropout=args.dropout)
        params["train_head"].update(epochs=args.epochs, patience=args.epochs)  # every epoch runs, as in the timing
        params["fine_tune"].update(epochs=args.epochs, patience=args.epochs, lr=args.fine_tune_lr,
                                   unfreeze_from=args.unfreeze_from)
        params["compute"]["cache_dtype"] = args.cache_dtype
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        stages = {}
        for name in FULL_DATA_STAGES:
            print(f"bench: full data, stage {name}", flush=True)
            log = work / f"{name}.log"
            start = time.perf_counter()
            with open(log, "w") as f:
                proc = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=work, stdout=f, stderr=subprocess.STDOUT,
                                        env=child_env(PYTHONPATH=os.pathsep.join(
                                            filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))))
                _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                tail = log.read_text().splitlines()[-40:]
                sys.exit(f"bench: stage {name} failed; last lines of its log:\n" + "\n".join(tail))
            stages[name] = {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
            live = work / "dvclive" / name / "metrics.json"
            if live.exists():
                stages[name]["epochs_run"] = json.loads(live.read_text())["step"] + 1
        with np.load(work / "data" / "resized" / "train.npz") as train_npz, np.load(work / "data" / "resized" / "val.npz") as val_npz:
            sizes = {"train_images": len(train_npz["labels"]), "val_images": len(val_npz["labels"])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = max(r["peak_rss_mib"] for r in stages.values()) * 2**20
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "config": {"data": str(args.data), "image_size": args.image_size, **sizes, "epochs": args.epochs,
                   "weights": args.weights, "unfreeze_from": args.unfreeze_from, "cache_dtype": args.cache_dtype,
                   "batch_size": args.batch_size, "cpus": os.cpu_count()},
        "stages": stages, "peak_rss_gb": round(peak / 1e9, 3), "target_gb": TARGET_GB, "target_met": peak <= TARGET_GB * 1e9,
    }
    save_results(args.out, {"full_data": result})
    print(full_data_table(result))
    print(f"\nbench: results in {args.out}")
    return result


def orchestrate(args) -> dict:
    if args.epochs < 1 or args.train < 2 or args.val < 2:
        sys.exit("bench: --epochs must be >= 1 and --train/--val >= 2")
    work = Path(tempfile.mkdtemp(prefix="pneumonia-bench-"))
    try:
        print(f"bench: preparing {args.train}/{args.val} images at {args.image_size} px from {args.data}", flush=True)
        data_info = prepare_data(args, work)
        spec = {
            "data": str(work / "subset.npz"), "work": str(work), "image_size": args.image_size, "weights": args.weights,
            "dropout": args.dropout, "seed": args.seed, "lr": args.lr, "fine_tune_lr": args.fine_tune_lr,
            "batch_size": args.batch_size, "epochs": args.epochs, "block": args.unfreeze_from,
            "cache_dtype": args.cache_dtype, "floor_epochs": max(1, min(args.floor_epochs, args.epochs)),
            "views": args.views,
            "head_model": str(work / "head.keras"), "estimate_for": data_info["full_sizes"],
        }
        phases = {}
        for phase in (1, 2):
            print(f"bench: phase {phase}", flush=True)
            phases[f"phase{phase}"] = run_variants(phase, spec, work, args.repeats)
        estimate = phases["phase2"]["floor"].pop("memory_estimate")
        env = phases["phase1"]["a"].pop("environment")
        for res in phases.values():
            for r in res.values():
                r.pop("environment", None)
        results = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), **env},
            "config": {
                "data": str(args.data), "image_size": args.image_size, "train_images": data_info["subset"]["train"]["images"],
                "val_images": data_info["subset"]["val"]["images"], "subset": data_info["subset"], "epochs": args.epochs,
                "weights": args.weights, "unfreeze_from": args.unfreeze_from, "lr": args.lr, "fine_tune_lr": args.fine_tune_lr,
                "batch_size": args.batch_size, "dropout": args.dropout, "seed": args.seed, "cache_dtype": args.cache_dtype,
                "floor_epochs_timed": spec["floor_epochs"], "views": args.views, "repeats_of_a_and_floor": max(1, args.repeats),
                "early_stopping": "off (patience = epochs)",
                "batchnorm_in_phase2": "trains in the suffix (weights none, as the fine_tune stage does)" if args.weights == "none"
                else "frozen (inference mode)",
            },
            "phases": summarize(args, phases),
            "targets": TARGETS,
            "memory_estimate_full_data": estimate,
        }
        results["targets_met"] = targets_met(results["phases"])
        results = save_results(args.out, results)
        print()
        print(table(results))
        print(f"\nbench: results in {args.out}")
        return results
    finally:
        if args.keep:
            print(f"bench: temporary folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- workers (one process per variant)

def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _busy_s() -> float:
    """CPU seconds every process on the machine has used so far (Linux /proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


class Clock:
    """Wall time, this process's CPU time, and the CPU time other processes took meanwhile."""

    def __init__(self):
        self.wall, self.cpu, self.busy = time.perf_counter(), _cpu_s(), _busy_s()

    def read(self) -> dict:
        wall, cpu = time.perf_counter() - self.wall, _cpu_s() - self.cpu
        others = max(0.0, _busy_s() - self.busy - cpu)
        return {"wall_s": wall, "cpu_s": cpu, "other_processes_cpu_s": others}


def _environment() -> dict:
    import keras

    env = {"backend": f"{keras.backend.backend()}", "keras": keras.__version__}
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        env["tensorflow"] = tf.__version__
        env["device"] = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    else:
        env["device"] = "unknown"
    return env


def _compile_like_the_project(model, lr, runtime):
    """The optimizer, loss and metrics pneumonia.train.fit compiles with."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
        jit_compile=runtime.jit_compile,
    )


def _starting_model(s, phase: int, runtime):
    from pneumonia import model as model_lib

    with runtime.scope():
        if phase == 1:
            return model_lib.build(s["image_size"], s["weights"], s["dropout"])
        return model_lib.load(s["head_model"])


def _phase_settings(s, phase: int) -> dict:
    """(block, train_batchnorm, lr) exactly as the stages decide them."""
    if phase == 1:
        return {"block": None, "train_batchnorm": False, "lr": s["lr"]}
    # stages/fine_tune.py: without pretrained weights there are no statistics to protect, so BatchNorm learns too.
    return {"block": s["block"], "train_batchnorm": s["weights"] == "none", "lr": s["fine_tune_lr"]}


def worker_project(s, phase: int, train_split, val_split, runtime, views: int = 0) -> dict:
    """Variant a: pneumonia.train.train_head / fine_tune, called as stages/train_head.py and fine_tune.py call them.

    Variant k (views > 0): the same with training-time augmentation, `views` augmented views cached.
    """
    from pneumonia import train
    from pneumonia.params import AugmentParams

    net = _starting_model(s, phase, runtime)
    work, ps = Path(s["work"]), _phase_settings(s, phase)
    common = dict(lr=ps["lr"], epochs=s["epochs"], patience=s["epochs"], batch_size=s["batch_size"], runtime=runtime,
                  live_dir=work / f"dvclive-{phase}-{views}", backup_dir=work / f"resume-{phase}-{views}",
                  augment=AugmentParams(enabled=True, views=views) if views else None)
    clock = Clock()
    if phase == 1:
        summary = train.train_head(net, train_split, val_split, **common)
    else:
        summary = train.fine_tune(net, train_split, val_split, block=ps["block"], train_batchnorm=ps["train_batchnorm"],
                                  cache_dtype=s["cache_dtype"], **common)
    timing = clock.read()
    if phase == 1 and not views:
        train.save(net, s["head_model"])  # the one phase-1 model every phase-2 variant starts from
    return {**timing, "val_auc": summary["best_val_auc"], "best_epoch": summary["best_epoch"]}


def worker_plain(s, phase: int, train_split, val_split, runtime) -> dict:
    """Variant b: fit on the full model from in-memory arrays; the same layers frozen, the same training settings."""
    import keras

    from pneumonia import model as model_lib
    from pneumonia import train

    net = _starting_model(s, phase, runtime)
    ps = _phase_settings(s, phase)
    clock = Clock()
    model_lib.set_trainable(net, ps["block"], train_batchnorm=ps["train_batchnorm"])
    with runtime.scope():
        _compile_like_the_project(net, ps["lr"], runtime)
    early = keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=s["epochs"], restore_best_weights=True)
    net.fit(train_split[0], train_split[1], validation_data=val_split, epochs=s["epochs"], batch_size=s["batch_size"],
            class_weight=train.class_weights(train_split[1]), shuffle=True, verbose=2, callbacks=[early])
    return {**clock.read(), "val_auc": round(float(early.best), 4), "best_epoch": int(early.best_epoch) + 1}


def worker_floor(s, phase: int, train_split, val_split, runtime) -> dict:
    """The compute floor: one warm forward pass of the frozen prefix, and warm suffix epochs on its activations."""
    import numpy as np

    from pneumonia import model as model_lib
    from pneumonia import train

    net = _starting_model(s, phase, runtime)
    ps = _phase_settings(s, phase)
    model_lib.set_trainable(net, ps["block"], train_batchnorm=ps["train_batchnorm"])
    prefix, suffix = model_lib.split(net, ps["block"])
    dtype = "float32" if phase == 1 else s["cache_dtype"]  # what the project caches in each phase
    x = train_split[0]
    size = train.chunk_size(len(x) + len(val_split[0]))  # the chunk shape variant a's prefix runs at
    prefix.predict_on_batch(np.zeros((size, *x.shape[1:]), x.dtype))  # trace and optimise it before timing
    clock = Clock()
    acts, acts_val = train.cache_train_val(prefix, train_split, val_split, dtype, "floor")  # the same work as a
    prefix = clock.read()

    y, yv = train_split[1], val_split[1]
    weights = train.class_weights(y)
    sample_weight = np.array([weights[int(label)] for label in y], dtype="float32")
    with runtime.scope():
        _compile_like_the_project(suffix, ps["lr"], runtime)
    bs = s["batch_size"]
    for n in (bs, 1):  # trace the train and test steps, batch dimension relaxed
        suffix.train_on_batch(acts[:n], y[:n], sample_weight=sample_weight[:n])
        suffix.test_on_batch(acts_val[:n], yv[:n])
    rng = np.random.default_rng(s["seed"])
    epochs = []
    for _ in range(s["floor_epochs"]):
        order = rng.permutation(len(y))
        clock = Clock()
        for i in range(0, len(y), bs):
            idx = order[i : i + bs]
            suffix.train_on_batch(acts[idx], y[idx], sample_weight=sample_weight[idx])
        for i in range(0, len(yv), bs):
            suffix.test_on_batch(acts_val[i : i + bs], yv[i : i + bs])
        epochs.append(clock.read())
    best = min(epochs, key=lambda e: e["wall_s"])  # the least disturbed epoch
    result = {
        "prefix_s": round(prefix["wall_s"], 3), "prefix_cpu_s": round(prefix["cpu_s"], 3),
        "suffix_epoch_s": round(best["wall_s"], 3), "suffix_epoch_cpu_s": round(best["cpu_s"], 3),
        "suffix_epoch_times_s": [round(e["wall_s"], 3) for e in epochs], "epochs": s["epochs"],
        "total_s": round(prefix["wall_s"] + best["wall_s"] * s["epochs"], 3),
        "total_cpu_s": round(prefix["cpu_s"] + best["cpu_s"] * s["epochs"], 3),
        "timed_wall_s": round(prefix["wall_s"] + sum(e["wall_s"] for e in epochs), 3),
        "other_processes_cpu_s": round(prefix["other_processes_cpu_s"] + sum(e["other_processes_cpu_s"] for e in epochs), 3),
        "activation_shape": list(acts.shape[1:]), "activation_dtype": dtype,
    }
    if phase == 2:
        result["memory_estimate"] = memory_estimate(s)
    return result


def memory_estimate(s, image_size: int = 224) -> dict:
    """The activation caches for all of train+val at 224 px, from the model's own shapes (no data needed)."""
    import keras
    import numpy as np

    from pneumonia import model as model_lib

    keras.backend.clear_session()
    net = model_lib.build(image_size, "none", 0.0)
    shape2 = [int(d) for d in model_lib.boundary(net, s["block"]).shape[1:]]
    shape1 = [int(d) for d in model_lib.boundary(net, None).shape[1:]]
    n = sum(s["estimate_for"].values())
    gib = 2**30
    p2 = n * int(np.prod(shape2)) * np.dtype(s["cache_dtype"]).itemsize
    train_share = s["estimate_for"]["train"] / n
    p2_views = p2 * (train_share * s["views"] + (1 - train_share))  # K views of the train images, val once
    p1 = n * int(np.prod(shape1)) * 4
    images = n * image_size * image_size
    return {
        "label": "estimate (computed from shapes, not measured)",
        "images": n, "split_sizes": s["estimate_for"], "image_size": image_size, "unfreeze_from": s["block"],
        "cache_dtype": s["cache_dtype"], "phase2_activation_shape": shape2, "phase2_cache_bytes": p2,
        "phase2_cache_gib": round(p2 / gib, 3), "views": s["views"], "phase2_cache_with_views_gib": round(p2_views / gib, 3),
        "phase1_feature_shape": shape1, "phase1_cache_bytes": p1,
        "phase1_cache_gib": round(p1 / gib, 4), "images_bytes": images, "images_gib": round(images / gib, 4),
        "note": "training gathers one batch at a time from the cache (pneumonia.train.Batches), so the cache is held "
                "once; the measured figure is python bench/bench.py --full-data",
    }


def worker(name: str, spec_path: str) -> None:
    import numpy as np

    s = json.loads(Path(spec_path).read_text())
    variant, phase = name[:-1], int(name[-1])
    from pneumonia import train
    from pneumonia.params import ComputeParams

    runtime = train.configure(s["seed"], ComputeParams(cache_dtype=s["cache_dtype"]))
    print(f"{name}: {runtime.describe()}", flush=True)
    with np.load(s["data"], allow_pickle=False) as npz:
        train_split, val_split = (npz["train_x"], npz["train_y"]), (npz["val_x"], npz["val_y"])
    if variant == "k":
        result = worker_project(s, phase, train_split, val_split, runtime, views=s["views"])
    else:
        run = {"a": worker_project, "b": worker_plain, "floor": worker_floor}[variant]
        result = run(s, phase, train_split, val_split, runtime)
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    result["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    result["train_images"] = int(len(train_split[1]))
    result["environment"] = _environment()
    Path(s["result"]).write_text(json.dumps(result))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.spec)
    elif args.full_data:
        full_data(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
