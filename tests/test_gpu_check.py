"""make gpu-check, dry run on CPU at tiny settings: every step runs, bounded and logged, and the results hold
what the README's GPU section quotes. (The GPU figures themselves come only from a GPU.)"""
import json
import subprocess
import sys

import pytest

import synthetic
from conftest import ROOT, load_script


def _outputs_and_params() -> dict:
    """Every file of this project's params, lock and outputs, with its size and mtime."""
    paths = [ROOT / "params.yaml", ROOT / "dvc.lock"]
    for folder in ("data", "models", "dvclive", "metrics", "plots", "reports"):
        paths += (ROOT / folder).rglob("*")
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()}


# Smaller than the other projects' file: the whole network trains at about 8 images/s on 2 cores, three times here.
SIZES = {"train": 96, "val": 64, "test": 64}


@pytest.mark.tools  # a whole benchmark-tool run: make test-tools (CI runs it after make test)
def test_gpu_check_runs_the_pipeline_every_phase_2_path_and_their_floors_and_writes_its_results(tmp_path):
    npz = synthetic.write(tmp_path / "pneumoniamnist.npz", sizes=SIZES)
    out = tmp_path / "results_gpu.json"
    before = _outputs_and_params()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--allow-cpu", "--data", str(npz), "--out", str(out),
         "--image-size", "32", "--head-epochs", "1", "--epochs", "1", "--batch-sizes", "32", "--extra-epochs", "1",
         "--paths", "cached-conv5-views",
         "--views", "2", "--floor-steps", "1", "--step-timeout", "900"],
        cwd=ROOT, capture_output=True, text=True, timeout=2400, env=synthetic.small_splits_env(sizes=SIZES),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert "failed" not in results and results["backend"] == "tensorflow"
    assert list(results["stages"]) == ["download", "resize", "train_head", "fine_tune", "evaluate", "error_analysis"]
    assert all(stage["wall_s"] > 0 for stage in results["stages"].values())
    assert results["pipeline_wall_s"] <= results["total_wall_s"]
    # Every devicestats phase entry is tagged with its path; the pipeline's keep their phase and batch size.
    phases = {(p["path"], p["phase"], p["batch_size"]): p for p in results["phases"]}
    # One batch size here (each one more is a whole-network run and its floor, minutes on CPU);
    # test_further_batch_sizes_each_get_their_own_floor covers more. Of the paths after the pipeline, the one
    # with the other floor: cached-conv5 is it without augmentation (the trained test project's path), and
    # whole-augmented is the pipeline's whole with augmentation on the fly (tests/test_augment.py trains it).
    assert list(phases) == [("whole", "train_head", 32), ("whole", "fine_tune", 32),
                            ("cached-conv5-views", "fine_tune", 32)]
    assert all(p["epochs"] == len(p["train_s_per_epoch"]) == len(p["val_s_per_epoch"]) == 1 for p in phases.values())
    for phase in phases.values():
        assert phase["train_images_per_s"] > 0 and phase["train_images"] == SIZES["train"]
        assert phase["mixed_precision"] is False and phase["jit_compile"] is False  # CPU: both auto-off
    # Each phase-2 run: its path, what the stage trained, what Keras compiled, its floor.
    runs = [(r["path"], r["batch_size"], r["epochs"], r["unfreeze_from"], r["augment"], r["cache_dtype"])
            for r in results["paths"]]
    assert runs == [("whole", 32, 1, "conv1", "none", None),
                    ("cached-conv5-views", 32, 1, "conv5_block1", "2 cached views", "float16")]
    for run in results["paths"]:
        assert run["train_images_per_s"] > 0 and run["wall_s"] > 0 and run["floor_ratio"] > 0
        phase = phases[(run["path"], "fine_tune", run["batch_size"])]  # its Throughput entry: what Keras compiled
        assert run["mixed_precision"] is phase["mixed_precision"] is False
        assert run["jit_compile"] is phase["jit_compile"]
        floor = results["floor"][run["unfreeze_from"]][str(run["batch_size"])]
        assert run["floor_images_per_s"] == floor["train_images_per_s"]
    assert results["phase2_over_floor"] == {"32": results["paths"][0]["floor_ratio"]}
    assert {block: sorted(floors) for block, floors in results["floor"].items()} == {"conv1": ["32"],
                                                                                     "conv5_block1": ["32"]}
    for block, floors in results["floor"].items():
        for floor in floors.values():
            assert floor["unfreeze_from"] == block and len(floor["train_s_per_epoch"]) == 3
            assert floor["train_images_per_s"] > 0 and floor["val_images_per_s"] > 0
            assert floor["mixed_precision"] is False and floor["jit_compile"] is False
    assert 0 <= results["metrics"]["roc_auc"] <= 1
    for name in ("whole ", "cached-conv5-views"):
        assert f"phase 2 {name}" in proc.stdout
    assert "phase 2 / floor" in proc.stdout
    # It ran in a copy: this project's params and outputs are as they were.
    assert _outputs_and_params() == before


def test_a_step_past_its_timeout_is_killed_and_the_run_says_so(tmp_path):
    npz = synthetic.write(tmp_path / "pneumoniamnist.npz", sizes=synthetic.PIPELINE_SIZES)
    out = tmp_path / "results_gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--allow-cpu", "--data", str(npz), "--out", str(out),
         "--image-size", "32", "--step-timeout", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=synthetic.small_splits_env() | {"KERAS_BACKEND": "tensorflow"},  # named: no import to find it
    )
    results = json.loads(out.read_text())
    assert proc.returncode == 1 and "ran past 3 s and was killed" in results["failed"]
    assert "FAILED" in proc.stdout and results["total_wall_s"] < 120


def test_further_batch_sizes_each_get_their_own_floor():
    """--batch-sizes 32,128: the whole network at 128 is a run of its own, set against the floor at 128."""
    gpu_check = load_script(ROOT / "bench" / "gpu_check.py")
    assert gpu_check.parse_args(["--batch-sizes", "32,128"]).batch_sizes == [32, 128]
    stats = [{"phase": "fine_tune", "path": path, "batch_size": batch, "unfreeze_from": block, "epochs": 2,
              "train_images_per_s": speed} for path, batch, block, speed in
             [("whole", 32, "conv1", 40.0), ("whole", 128, "conv1", 90.0), ("cached-conv5", 32, "conv5_block1", 300.0)]]
    floors = {"conv1": {32: {"train_images_per_s": 80.0}, 128: {"train_images_per_s": 100.0}},
              "conv5_block1": {32: {"train_images_per_s": 400.0}}}
    summary = gpu_check.summarize(stats, floors)
    assert [(p["path"], p["batch_size"], p["floor_images_per_s"], p["floor_ratio"]) for p in summary["paths"]] == [
        ("whole", 32, 80.0, 0.5), ("whole", 128, 100.0, 0.9), ("cached-conv5", 32, 400.0, 0.75)]
    assert summary["phase2_over_floor"] == {32: 0.5, 128: 0.9}  # the whole network's, per batch size


def test_untagged_phase_entries_read_as_the_pipeline_whole_network_path():
    gpu_check = load_script(ROOT / "bench" / "gpu_check.py")
    older = [{"phase": "fine_tune", "batch_size": 32, "epochs": 20, "train_images_per_s": 50.0,
              "mixed_precision": True, "jit_compile": True}]
    summary = gpu_check.summarize(older, {"conv1": {32: {"train_images_per_s": 200.0}}})
    assert summary["paths"][0] | {"floor_ratio": 0.25} == summary["paths"][0]
    assert summary["paths"][0]["path"] == "whole" and summary["phase2_over_floor"] == {32: 0.25}
