"""The README's scaling commands through the real DVC CLI: a queued sweep, and a remote shared with a clone.

Both start from the trained baseline (committed with its dvc.lock): queued experiments start from the
committed state and take download and resize from the cache.
"""
import io
import json
import re
import sys
import time

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

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
    baseline = trained_repo
    out = baseline.dvc("exp", "run", "--queue", "-S", "lr=1e-3,1e-5").stdout
    assert out.count("Queueing with overrides") == 2, out
    baseline.dvc("queue", "start", "--jobs", "1")
    status = _wait_for_queue(baseline)
    assert status.count("Success") == 2, status

    experiments = _experiments(json.loads(baseline.dvc("exp", "show", "--json").stdout))
    by_lr = {exp["params"]["params.yaml"]["data"]["lr"]: exp for exp in experiments.values()}
    assert set(by_lr) == {1e-3, 1e-5}, experiments.keys()
    losses = set()
    for exp in by_lr.values():
        test = exp["metrics"]["metrics/metrics.json"]["data"]["test"]
        assert 0 <= test["roc_auc"] <= 1 and test["tp"] + test["fn"] + test["tn"] + test["fp"] == synthetic.PIPELINE_SIZES["test"]
        losses.add(test["loss"])
    assert len(losses) == 2  # a 100x different head lr trains a different model (AUC alone saturates here)
    assert "lr: 0.0001" in (baseline.path / "params.yaml").read_text()  # the workspace is untouched

    # The report's ensemble, checked against the two experiments' own predictions read from their git refs.
    proc = baseline.run(sys.executable, "-m", "pneumonia.report")
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
    revs = [baseline_row["experiments"][i]["revs"][0]["rev"] for baseline_row in
            json.loads(baseline.dvc("exp", "show", "--json").stdout) if baseline_row.get("experiments")
            for i in range(len(baseline_row["experiments"]))]
    tables = [pd.read_csv(io.StringIO(baseline.git("show", f"{rev}:metrics/predictions.csv").stdout),
                          float_precision="round_trip") for rev in revs]
    test = tables[0]["split"] == "test"
    mean = np.mean([t.loc[test, "calibrated_probability"] for t in tables], axis=0)
    assert rows["test.roc_auc"][5] == f"{round(roc_auc_score(tables[0].loc[test, 'label'], mean), 4):.4f}"


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
