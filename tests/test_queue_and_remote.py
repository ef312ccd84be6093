"""The README's scaling commands through the real DVC CLI: a queued sweep, and a remote shared with a clone.

Both start from the trained baseline (committed with its dvc.lock): queued experiments start from the
committed state and take download and resize from the cache.
"""
import json
import re
import sys
import time

import synthetic
from conftest import Repo

QUEUE_DEADLINE_S = 900


def _wait_for_queue(repo: Repo) -> str:
    """Poll `dvc queue status` until no task is queued or running and the worker has exited."""
    deadline = time.monotonic() + QUEUE_DEADLINE_S
    while True:
        status = repo.dvc("queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status) and "Worker status: 0 active, 0 idle" in status:
            return status
        assert time.monotonic() < deadline, f"queue still busy after {QUEUE_DEADLINE_S} s:\n{status}"
        time.sleep(5)


def _experiments(shown: list) -> dict[str, dict]:
    """{experiment name: its `data`} from `dvc exp show --json` (baseline rows excluded)."""
    found = {}
    for baseline_row in shown:
        for exp in baseline_row.get("experiments") or []:
            row = exp["revs"][0]
            found[row["name"]] = row["data"]
    return found


def test_queued_sweep_runs_every_value(trained_repo):
    """A sweep of evaluate params through `dvc queue`: the queued runs rerun evaluate and error analysis only
    (training is the same), in the background, one value each, with the calibration the sweep sets."""
    baseline = trained_repo
    out = baseline.dvc("exp", "run", "--queue", "-S", "evaluate.threshold.target_sensitivity=0.9,0.6",
                       "-S", "evaluate.calibration=temperature").stdout
    assert out.count("Queueing with overrides") == 2, out
    baseline.dvc("queue", "start", "--jobs", "1")
    status = _wait_for_queue(baseline)
    assert status.count("Success") == 2, status

    experiments = _experiments(json.loads(baseline.dvc("exp", "show", "--json").stdout))
    for name in experiments:
        log = baseline.dvc("queue", "logs", name).stdout
        assert set(re.findall(r"Running stage '(\w+)'", log)) == {"download", "evaluate", "error_analysis"}, log[-2000:]

    def target(exp):
        return exp["params"]["params.yaml"]["data"]["evaluate"]["threshold"]["target_sensitivity"]

    by_target = {target(exp): exp for exp in experiments.values()}
    assert set(by_target) == {0.9, 0.6}, experiments.keys()
    recalls = {}
    for value, exp in by_target.items():
        test = exp["metrics"]["metrics/metrics.json"]["data"]["test"]
        assert 0 <= test["roc_auc"] <= 1 and test["tp"] + test["fn"] + test["tn"] + test["fp"] == synthetic.PIPELINE_SIZES["test"]
        recalls[value] = exp["metrics"]["metrics/metrics.json"]["data"]["val"]["recall"]
        calibration = exp["metrics"]["metrics/metrics.json"]["data"]["calibration"]
        assert calibration["method"] == "temperature" and calibration["temperature"] > 0
        assert calibration["offset"] == calibration["prevalence_shift"]  # temperature fits no offset of its own
    assert recalls[0.9] >= 0.9 and recalls[0.9] > recalls[0.6] >= 0.6  # each run's own operating point
    assert "target_sensitivity: 0.95" in (baseline.path / "params.yaml").read_text()  # the workspace is untouched

    # A sweep is two recipes, not two seeds of one: the report names what differs instead of averaging it
    # (tests/test_report.py checks its ensemble of seeds against the experiments' git refs).
    proc = baseline.run(sys.executable, "-m", "pneumonia.report", check=False)
    values = ", ".join(f"{name}={target(exp)}" for name, exp in sorted(experiments.items()))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.splitlines() == [
        f"error: the experiments differ in more than seed (evaluate.threshold.target_sensitivity {values}); pass "
        "names of experiments that differ only by seed, e.g. python -m pneumonia.report seed-1 seed-2 seed-3"]


def test_remote_push_then_clone_and_pull_restores_models(trained_repo, tmp_path):
    baseline = trained_repo
    remote = tmp_path / "remote"
    baseline.dvc("remote", "add", "-d", "store", str(remote))
    baseline.git("commit", "-qam", "DVC remote")
    baseline.dvc("push")
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = Repo(tmp_path / "clone")
    baseline.git("clone", "-q", str(baseline.path), str(clone.path))
    assert not (clone.path / "models/model.keras").exists()
    clone.dvc("pull")
    for name in ("models/model.keras", "models/head.keras"):
        assert (clone.path / name).read_bytes() == (baseline.path / name).read_bytes(), name
    # Nothing to rerun: only download's standing entry (it checks its source's content on every repro).
    assert json.loads(clone.dvc("status", "--json").stdout) == {"download": ["always changed"]}
