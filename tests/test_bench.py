"""make bench at tiny settings: every field of results.json is there and sane (no timing targets asserted)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import synthetic
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 1


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.tools  # a whole benchmark-tool run: make test-tools (CI runs it after make test)
def test_bench_runs_and_writes_every_field(tmp_path):
    npz = synthetic.write(tmp_path / "synthetic.npz")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--data", str(npz), "--out", str(out), "--image-size", "32",
         "--train", "32", "--val", "16", "--epochs", str(EPOCHS), "--floor-epochs", "1", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speed-up b/a" in proc.stdout and "memory ESTIMATE" in proc.stdout and "4 augmented views cost" in proc.stdout

    results = json.loads(out.read_text())
    assert {"date", "command", "machine", "config", "phases", "targets", "targets_met", "memory_estimate_full_data"} <= set(results)
    assert results["machine"]["cpus"] >= 1 and results["machine"]["backend"]
    config = results["config"]
    assert (config["image_size"], config["train_images"], config["val_images"], config["epochs"]) == (32, 32, 16, EPOCHS)
    assert config["weights"] == "none" and config["repeats_of_a_and_floor"] == 1
    # stratified: both classes in both subsets
    for split in ("train", "val"):
        assert 0 < config["subset"][split]["pneumonia"] < config["subset"][split]["images"]

    assert set(results["phases"]) == {"phase1", "phase2"}
    for phase in results["phases"].values():
        for variant in ("a", "b", "k"):
            r = phase[variant]
            for key in ("wall_s", "cpu_s", "images_per_s", "peak_rss_mib", "process_wall_s"):
                assert _positive(r[key]), (variant, key, r[key])
            assert r["other_processes_cpu_s"] >= 0 and r["other_processes_cores"] >= 0
            assert 0.0 <= r["val_auc"] <= 1.0
            assert 1 <= r["best_epoch"] <= EPOCHS
            assert r["train_images"] == 32
            assert abs(r["images_per_s"] - 32 * EPOCHS / r["wall_s"]) < 0.1
        # one run each (--repeats 1); test_the_fastest_run_counts_and_every_run_is_kept covers more
        for variant in ("a", "b", "k"):
            assert phase[variant]["runs_s"] == [phase[variant]["wall_s"]]
        for key in ("views_k_over_a", "views_cpu_k_over_a", "views_peak_rss_k_over_a"):
            assert _positive(phase[key]), (key, phase[key])
        floor = phase["floor"]
        assert floor["runs_s"] == [floor["total_s"]]
        for key in ("prefix_s", "prefix_cpu_s", "suffix_epoch_s", "suffix_epoch_cpu_s", "total_s", "total_cpu_s", "timed_wall_s"):
            assert _positive(floor[key]), (key, floor[key])
        assert floor["other_processes_cores"] >= 0
        assert floor["epochs"] == EPOCHS
        assert math.isclose(floor["total_s"], floor["prefix_s"] + floor["suffix_epoch_s"] * EPOCHS, rel_tol=1e-2, abs_tol=1e-2)
        for key in ("speedup_b_over_a", "a_over_floor", "b_over_floor", "cpu_speedup_b_over_a", "cpu_a_over_floor"):
            assert _positive(phase[key]), (key, phase[key])
        assert 0.0 <= phase["val_auc_difference"] <= 1.0
    assert results["phases"]["phase1"]["floor"]["activation_shape"] == [2048]
    assert results["phases"]["phase2"]["floor"]["activation_dtype"] == "float16"

    assert all(isinstance(v, bool) for v in results["targets_met"].values()) and len(results["targets_met"]) == 4
    estimate = results["memory_estimate_full_data"]
    assert "estimate" in estimate["label"]
    assert estimate["images"] == 4708 + 524 and estimate["phase2_activation_shape"] == [14, 14, 1024]
    assert estimate["phase2_cache_bytes"] == (4708 + 524) * 14 * 14 * 1024 * 2
    assert math.isclose(estimate["phase2_cache_with_views_gib"] * 2**30, (4708 * 4 + 524) * 14 * 14 * 1024 * 2, rel_tol=1e-3)


def test_the_fastest_run_counts_and_every_run_is_kept(monkeypatch, tmp_path):
    """--repeats 3: a and the floor run three times each, interleaved with b and k (once each); the fastest counts."""
    bench = load_script(ROOT / "bench" / "bench.py")
    order, times = [], iter([5.0, 9.0, 7.0, 4.0, 3.0, 6.0, 8.0, 2.0])

    def run_worker(name, spec, work):
        order.append(name)
        return {"total_s" if name.startswith("floor") else "wall_s": next(times), "run": len(order)}

    monkeypatch.setattr(bench, "run_worker", run_worker)
    phase = bench.run_variants(2, {}, tmp_path, repeats=3)
    assert order == ["a2", "b2", "k2", "floor2", "a2", "floor2", "a2", "floor2"]
    assert phase["a"]["runs_s"] == [5.0, 3.0, 8.0] and phase["a"]["wall_s"] == 3.0 and phase["a"]["run"] == 5
    assert phase["floor"]["runs_s"] == [4.0, 6.0, 2.0] and phase["floor"]["total_s"] == 2.0
    assert phase["b"]["runs_s"] == [9.0] and phase["k"]["runs_s"] == [7.0]


@pytest.mark.tools  # a whole benchmark-tool run: make test-tools (CI runs it after make test)
def test_full_data_mode_measures_each_real_stage_and_keeps_the_timing_results(tmp_path):
    npz = synthetic.write(tmp_path / "synthetic.npz", sizes=synthetic.PIPELINE_SIZES)  # "all" the images of this file
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"phases": {"phase1": "from an earlier timing run"}}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--full-data", "--data", str(npz), "--out", str(out),
         "--image-size", "32", "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, env=synthetic.small_splits_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n_train, n_val = synthetic.PIPELINE_SIZES["train"], synthetic.PIPELINE_SIZES["val"]
    assert f"MEASURED, the real stages on all {n_train} train + {n_val} val images at 32 px" in proc.stdout

    results = json.loads(out.read_text())
    assert results["phases"] == {"phase1": "from an earlier timing run"}  # the other mode's entry is kept
    full = results["full_data"]
    assert (full["config"]["train_images"], full["config"]["val_images"], full["config"]["image_size"]) == (n_train, n_val, 32)
    assert list(full["stages"]) == ["download", "resize", "train_head", "fine_tune"]
    for stage in full["stages"].values():
        assert _positive(stage["wall_s"]) and _positive(stage["peak_rss_mib"])
    assert full["stages"]["train_head"]["epochs_run"] == full["stages"]["fine_tune"]["epochs_run"] == 1
    # training holds a model and its activation cache: more memory than copying a file
    assert full["stages"]["fine_tune"]["peak_rss_mib"] > full["stages"]["download"]["peak_rss_mib"]
    peak_mib = max(s["peak_rss_mib"] for s in full["stages"].values())
    assert math.isclose(full["peak_rss_gb"], peak_mib * 2**20 / 1e9, rel_tol=1e-3)
    assert full["target_met"] is (full["peak_rss_gb"] <= full["target_gb"])


def test_full_data_mode_reports_a_failing_stage_in_one_message(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--full-data", "--data", str(tmp_path / "missing.npz"),
         "--out", str(out), "--image-size", "32", "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "bench: stage download failed" in proc.stderr and "missing.npz" in proc.stderr
    assert not out.exists()
