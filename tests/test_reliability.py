"""Identical reruns and a killed training stage, through the real DVC CLI."""
import signal
import subprocess
import sys
import time


def _outputs(repo):
    return {name: (repo.path / name).read_bytes() for name in ("metrics/metrics.json", "metrics/predictions.csv")}


def test_reruns_are_byte_identical_and_a_killed_stage_leaves_nothing_partial(repo):
    repo.dvc("repro")
    first = _outputs(repo)

    # Rerun everything, and kill fine_tune mid-epoch (SIGTERM, then SIGKILL if it lingers).
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f"], cwd=repo.path, env=repo.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Running stage 'fine_tune'" in "".join(seen) and "caching val activations: 524/524" in line:
            break
    time.sleep(3)  # inside the first epoch
    stage = subprocess.run(["pgrep", "-f", "stages.fine_tune"], capture_output=True, text=True).stdout.split()
    assert stage, "".join(seen)
    for pid in stage:
        subprocess.run(["kill", "-TERM", pid])
    try:
        rest = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        for pid in stage:
            subprocess.run(["kill", "-KILL", pid])
        rest = proc.communicate()[0]
    assert proc.returncode != 0
    assert "fine_tune interrupted" in rest, rest[-2000:]
    models = sorted(p.name for p in (repo.path / "models").iterdir() if p.name != ".gitignore")
    assert models == ["head.keras"]  # no final model, and no temporary file left behind

    repo.dvc("repro")  # picks up where it stopped
    assert _outputs(repo) == first
