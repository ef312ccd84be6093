"""Identical reruns and a killed training stage, through the real DVC CLI."""
import signal
import subprocess
import sys
import time

import psutil


def _outputs(repo):
    return {name: (repo.path / name).read_bytes() for name in ("metrics/metrics.json", "metrics/predictions.csv")}


def test_reruns_are_byte_identical_and_a_killed_stage_leaves_nothing_partial(trained_repo):
    repo = trained_repo
    first = _outputs(repo)

    # Rerun everything, and kill fine_tune mid-epoch (SIGTERM, then SIGKILL if it lingers).
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f"], cwd=repo.path, env=repo.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Running stage 'fine_tune'" in "".join(seen) and "  training " in line:
            break
    time.sleep(3)  # inside the first epoch (about 20 s at these settings)
    # Only this repo's stage: the python process under this dvc, not its shell wrapper.
    stage = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.cmdline()[:3] == ["python", "-m", "stages.fine_tune"] or p.cmdline()[1:3] == ["-m", "stages.fine_tune"]]
    assert len(stage) == 1, "".join(seen)
    stage[0].send_signal(signal.SIGTERM)
    try:
        rest = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        stage[0].kill()
        rest = proc.communicate()[0]
    assert proc.returncode != 0, "".join(seen)[-3000:] + rest[-3000:]
    assert "fine_tune interrupted" in rest, rest[-2000:]
    models = sorted(p.name for p in (repo.path / "models").iterdir() if p.name != ".gitignore")
    assert models == ["head.keras"]  # no final model, and no temporary file left behind

    repo.dvc("repro")  # picks up where it stopped
    assert _outputs(repo) == first
