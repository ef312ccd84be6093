"""A training stage killed after a checkpoint, resumed by `dvc repro`, ends as if never interrupted; writes are atomic."""
import json
import signal
import subprocess
import sys
import threading

import keras
import numpy as np
import psutil
import pytest

from pneumonia import files


def _results(repo) -> dict:
    """What fine_tune produced: model weights, the model's record and the training curves (evaluate's outputs
    follow from the weights)."""
    p = repo.path
    out = {name: (p / name).read_bytes() for name in ("models/model.json", "dvclive/fine_tune/metrics.json")}
    for tsv in sorted((p / "dvclive/fine_tune/plots/metrics").rglob("*.tsv")):
        header, *rows = [line.split("\t") for line in tsv.read_text().splitlines()]
        step = header.index("step")  # the timestamp column, where present, differs between any two runs
        out[tsv.name + tsv.parent.name] = [(r[step], r[-1]) for r in rows]
    model = keras.saving.load_model(p / "models/model.keras", compile=False)
    out["weights"] = [w.tobytes() for w in model.get_weights()]
    return out


def _stage_process(dvc_pid: int, stage: str):
    """The python process running `stage` under this dvc (not its shell wrapper)."""
    found = [p for p in psutil.Process(dvc_pid).children(recursive=True)
             if p.cmdline()[:3] == ["python", "-m", f"stages.{stage}"] or p.cmdline()[1:3] == ["-m", f"stages.{stage}"]]
    assert len(found) == 1, found
    return found[0]


def test_a_stage_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(trained_repo):
    repo = trained_repo
    uninterrupted = _results(repo)  # the trained project's own run: 2 fine_tune epochs, never interrupted
    repo.env["PNEUMONIA_CHECKPOINT_EVERY_S"] = "0"  # a checkpoint after every epoch (the default waits 30 s)

    # The same run again, killed (SIGTERM) once the checkpoint after epoch 1 exists: inside epoch 2.
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "-s", "fine_tune"], cwd=repo.path,
                            env=repo.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "checkpoint after epoch 1" in line:
            break
    stage = _stage_process(proc.pid, "fine_tune")
    stage.send_signal(signal.SIGTERM)
    try:
        rest = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        stage.kill()
        rest = proc.communicate()[0]
    assert proc.returncode != 0, "".join(seen)[-3000:] + rest[-3000:]
    assert "fine_tune interrupted" in rest and "epoch 2" not in "".join(seen), rest[-2000:]
    checkpoints = list((repo.path / ".cache/resume").glob("fine_tune-*/epoch-1/state.json"))
    assert len(checkpoints) == 1
    assert not (repo.path / "models/model.keras").exists()
    assert not [p.name for p in (repo.path / "models").iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]

    out = repo.dvc("repro", "fine_tune").stdout  # picks up where it stopped
    assert "resuming an interrupted run after epoch 1" in out
    assert not list((repo.path / ".cache/resume").iterdir())  # cleaned up on success
    assert _results(repo) == uninterrupted


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"the previous model")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a new mod")
            assert target.read_bytes() == b"the previous model"  # not visible until the block succeeds
            raise KeyboardInterrupt
    assert target.read_bytes() == b"the previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]
    files.write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"new": True} and [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_a_killed_writer_process_never_leaves_a_partial_file(tmp_path):
    """A process killed (SIGKILL, nothing cleaned up) while writing: the target is the old file or the new, whole."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from pneumonia import files\n"
            "from pathlib import Path\n"
            "with files.atomic_path(Path(sys.argv[1])) as tmp:\n"
            "    with open(tmp, 'wb') as f:\n"
            "        for _ in range(6000):\n"
            "            f.write(b'x' * 1024); f.flush(); time.sleep(0.01)\n")
    from conftest import ROOT

    writer = subprocess.Popen([sys.executable, "-c", code, str(target), str(ROOT)])
    timer = threading.Timer(1.5, writer.kill)
    timer.start()
    writer.wait(timeout=60)
    timer.cancel()
    assert target.read_bytes() == b"old"
    assert np.all([p.name == "big.bin" or p.name.endswith(".tmp.bin") for p in tmp_path.iterdir()])
