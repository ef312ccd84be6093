"""make gpu-check, dry run on CPU at tiny settings: every step runs, bounded and logged, and the results hold
what the README's GPU section quotes. (The GPU figures themselves come only from a GPU.)"""
import json
import subprocess
import sys

import synthetic
from conftest import ROOT


def _outputs_and_params() -> dict:
    """Every file of this project's params, lock and outputs, with its size and mtime."""
    paths = [ROOT / "params.yaml", ROOT / "dvc.lock"]
    for folder in ("data", "models", "dvclive", "metrics", "plots", "reports"):
        paths += (ROOT / folder).rglob("*")
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()}


def test_gpu_check_runs_the_whole_pipeline_and_the_floor_and_writes_its_results(tmp_path):
    npz = synthetic.write(tmp_path / "pneumoniamnist.npz", sizes=synthetic.PIPELINE_SIZES)
    out = tmp_path / "results_gpu.json"
    before = _outputs_and_params()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--allow-cpu", "--data", str(npz), "--out", str(out),
         "--image-size", "32", "--head-epochs", "1", "--epochs", "2", "--batch-sizes", "32,64", "--extra-epochs", "1",
         "--floor-steps", "2", "--step-timeout", "900"],
        cwd=ROOT, capture_output=True, text=True, timeout=2400, env=synthetic.small_splits_env(),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert "failed" not in results and results["backend"] == "tensorflow"
    assert list(results["stages"]) == ["download", "resize", "train_head", "fine_tune", "evaluate", "error_analysis"]
    assert all(stage["wall_s"] > 0 for stage in results["stages"].values())
    assert results["pipeline_wall_s"] <= results["total_wall_s"]
    phases = {(p["phase"], p["batch_size"]): p for p in results["phases"]}
    assert set(phases) == {("train_head", 32), ("fine_tune", 32), ("fine_tune", 64)}
    assert phases[("fine_tune", 32)]["epochs"] == 2 and len(phases[("fine_tune", 32)]["val_s_per_epoch"]) == 2
    for phase in phases.values():
        assert phase["train_images_per_s"] > 0 and phase["train_images"] == synthetic.PIPELINE_SIZES["train"]
        assert phase["mixed_precision"] is False and phase["jit_compile"] is False  # CPU: both auto-off
    for batch in ("32", "64"):
        floor = results["floor"][batch]
        assert floor["train_images_per_s"] > 0 and floor["val_images_per_s"] > 0 and len(floor["epoch_s"]) == 3
        assert results["phase2_over_floor"][batch] > 0
    assert 0 <= results["metrics"]["roc_auc"] <= 1
    assert "floor at batch 64" in proc.stdout and "phase 2 / floor" in proc.stdout
    # It ran in a copy: this project's params and outputs are as they were.
    assert _outputs_and_params() == before


def test_a_step_past_its_timeout_is_killed_and_the_run_says_so(tmp_path):
    npz = synthetic.write(tmp_path / "pneumoniamnist.npz", sizes=synthetic.PIPELINE_SIZES)
    out = tmp_path / "results_gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--allow-cpu", "--data", str(npz), "--out", str(out),
         "--image-size", "32", "--step-timeout", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=synthetic.small_splits_env(),
    )
    results = json.loads(out.read_text())
    assert proc.returncode == 1 and "ran past 3 s and was killed" in results["failed"]
    assert "FAILED" in proc.stdout and results["total_wall_s"] < 120
